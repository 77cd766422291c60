"""Log lines leave the event loop through a bounded queue, and a thread of their own writes them.

Writing a line to the process's output is a system call on the event loop, once per request for
the access log: while a flood of requests is answered, those writes are what a health probe waits
behind, and a reader of the output that falls behind (a log collector under pressure) would stall
every request. Here the loop only formats the line and queues it. A line that finds the queue full
is dropped and counted, and the next line that fits is preceded by one saying how many were lost:
the log is never a reason for a request to wait.
"""
import atexit
import logging
import logging.handlers
import queue

QUEUED_LINES = 8192  # lines waiting for the writer; about 2 MB of access log at most


class QueuedLogHandler(logging.handlers.QueueHandler):
    def __init__(self, size: int = QUEUED_LINES) -> None:
        super().__init__(queue.Queue(size))
        self.dropped = 0  # changed under the handler's lock, which logging takes around enqueue

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The record as it is queued: its message merged now (its arguments may change after), the
        rest formatted by the writer. It is not copied, as the base class does for other handlers
        that might see it: no other handler does."""
        record.msg, record.args = record.getMessage(), None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                self.queue.put_nowait(self._dropped_note())
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _dropped_note(self) -> logging.LogRecord:
        return logging.LogRecord("service", logging.WARNING, __file__, 0,
                                 "%d log lines dropped: the process's output was not read fast enough",
                                 (self.dropped,), None)


def write_through_queue(logger: logging.Logger, handler: logging.Handler, size: int = QUEUED_LINES) -> None:
    """`logger`'s lines go to `handler` on a writer thread; what is queued at exit is written."""
    queued = QueuedLogHandler(size)
    writer = logging.handlers.QueueListener(queued.queue, handler)
    writer.start()
    atexit.register(writer.stop)
    logger.addHandler(queued)
