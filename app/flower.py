"""`python -m app.flower [OPTIONS]`: Celery's Flower, logging JSON lines like every other process."""
import logging
import sys

from app.logs import configure


def main() -> None:
    configure()
    logging.captureWarnings(True)
    from run import celery

    if celery.conf.broker_url.startswith("filesystem://"):
        # `make run` starts Flower beside the workers: its first inspection finds none up yet and
        # warns of each method. They show up within seconds; that is no news on a laptop.
        logging.getLogger("flower.inspector").setLevel(logging.ERROR)
    # --logging=none: tornado adds no plain-text handler of its own; the root JSON handler prints.
    celery.start(["flower", "--logging=none", *sys.argv[1:]])


if __name__ == "__main__":
    main()
