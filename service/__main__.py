"""`python -m service` (or the `cnn-serve` script): serve the repository with uvicorn."""
import uvicorn

from service.app import create_app
from service.settings import Settings


def main() -> None:
    settings = Settings()
    # Our own middleware logs one line per request with timings, so uvicorn's access log is off.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, access_log=False)


if __name__ == "__main__":
    main()
