"""Entry points: `run:app` for Flask and gunicorn, `run:celery` for every celery command."""
import os

from app import create_app

app = create_app()
celery = app.extensions["celery"]

if __name__ == "__main__":
    from app.logs import configure

    configure()  # JSON lines, as under gunicorn
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", 5000)), debug=app.config["APP_ENV"] == "development")
