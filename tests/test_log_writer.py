"""Log lines are written by a thread of their own: a logging call never waits for the output, and
what a stalled output cannot take is dropped and said so."""
import io
import logging
import threading
import time

from service.log_writer import write_through_queue


class StalledOutput(io.StringIO):
    """An output whose reader has stopped reading until `resume` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.writing, self.resume = threading.Event(), threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        self.resume.wait(10)
        return super().write(text)


def test_a_stalled_output_neither_blocks_a_logging_call_nor_loses_lines_silently():
    output = StalledOutput()
    logger = logging.getLogger("test_log_writer")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(output)
    write_through_queue(logger, handler, size=4)
    try:
        logger.info("line %d", 0)
        assert output.writing.wait(5)  # the writer holds line 0, stuck
        started = time.perf_counter()
        for n in range(1, 20):
            logger.info("line %d", n)
        assert time.perf_counter() - started < 1.0  # the writer is stuck on the first line
        output.resume.set()
        written("line 4\n", output)  # the queue has room again
        logger.info("after")
        written("after\n", output)
    finally:
        output.resume.set()
        logger.handlers.clear()
    lines = output.getvalue().splitlines()
    # Lines 1-4 filled the queue while the writer was stuck on line 0; 5-19 were dropped.
    assert lines[:5] == [f"line {n}" for n in range(5)]
    assert lines[5:] == ["15 log lines dropped: the process's output was not read fast enough", "after"]


def written(text: str, output: io.StringIO) -> None:
    deadline = time.monotonic() + 5
    while text not in output.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
