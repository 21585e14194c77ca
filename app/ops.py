"""Operations endpoints: liveness."""
from flask import Blueprint

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health():
    """Alive: touches no dependency."""
    return {"status": "ok"}
