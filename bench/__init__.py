"""Tooling around the model server, kept out of the runtime package and image: the load benchmark
(`python -m bench`), the plain FastAPI baseline it compares with (`python -m bench.baseline`), and
the server process helpers the bench and the tests share (`bench.servers`)."""
