"""Console pages (/console): load -> check -> act -> render, over the same functions as the JSON API."""
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from flask import (Blueprint, flash, g, make_response, redirect, render_template, request, send_from_directory,
                   session, url_for)
from flask_jwt_extended import set_access_cookies, set_refresh_cookies
from marshmallow import ValidationError

from app import lifecycle, rollups
from app.accounts import schemas, users
from app.console.session import check_signed_out_csrf, end_session, signed_in, signed_out_csrf_token
from app.errors import ApiError, schema_details
from app.manage import app_rules, apps, event_queries
from app.manage import schemas as manage_schemas

VENDOR = Path(__file__).resolve().parent.parent / "static" / "vendor"
bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static")

# The chart's time ranges: label -> (span, bucket).
RANGES = {"1h": (timedelta(hours=1), "minute"), "24h": (timedelta(hours=24), "hour"),
          "7d": (timedelta(days=7), "hour"), "30d": (timedelta(days=30), "day")}
LEVELS = rollups.LEVELS
# A new key rides from the POST that made it to the page that shows it (POST-redirect-GET: a reload repeats
# nothing) in Flask's session cookie, which is signed and HttpOnly, and emptied by that page's first view.
NEW_KEY = "console.new_key"


@bp.get("/vendor/<path:filename>")
def vendor(filename):
    """Vendored libraries (app/static/vendor, see VENDORED.md)."""
    return send_from_directory(VENDOR, filename, max_age=3600)


# The forms used before sign-in; their CSRF value is not a JWT's (there is none yet): see session.py.
SIGNED_OUT_FORMS = {"console.sign_in", "console.sign_up", "console.verify", "console.forgot", "console.reset"}


@bp.before_request
def check_signed_out_form():
    if request.method == "POST" and request.endpoint in SIGNED_OUT_FORMS:
        check_signed_out_csrf()


@bp.context_processor
def signed_out_csrf():
    return {"signed_out_csrf_token": signed_out_csrf_token}


@bp.errorhandler(ApiError)
def api_error_page(error):
    return render_template("console/error.html", error=error), error.status


def _load(schema, form) -> dict:
    """The form through the accounts' own schema; errors by field as an ApiError."""
    try:
        return schema().load(form)
    except ValidationError as error:
        details = schema_details(error.messages)
        raise ApiError(422, "invalid_request", "; ".join(f"{d['path'].lstrip('/')}: {d['message']}" for d in details),
                       details) from None


def _form(*names) -> dict:
    return {name: request.form.get(name, "") for name in names}


def _field_errors(error: ApiError) -> dict:
    return {d["path"].lstrip("/"): d["message"] for d in error.details or [] if isinstance(d, dict) and "path" in d}


# --- account pages ---------------------------------------------------------------------------


@bp.get("/")
def home():
    return redirect(url_for("console.app_list"))


@bp.route("/sign-up", methods=["GET", "POST"])
def sign_up():
    """Create an account; the code is mailed."""
    if request.method == "GET":
        return render_template("console/sign_up.html", form={}, errors={})
    form = _form("email", "password")
    try:
        body = _load(schemas.CredentialsSchema, form)
        users.register(body["email"], body["password"])
    except ApiError as error:
        return render_template("console/sign_up.html", form=form, errors=_field_errors(error), message=error.message), \
            error.status
    flash("We mailed you a 6-digit code: enter it below.")
    return redirect(url_for("console.verify", email=body["email"]))


@bp.route("/verify", methods=["GET", "POST"])
def verify():
    """Confirm the address with the mailed code."""
    if request.method == "GET":
        return render_template("console/verify.html", form={"email": request.args.get("email", "")}, errors={})
    form = _form("email", "code")
    try:
        body = _load(schemas.VerifyEmailSchema, form)
        users.verify_email(body["email"], body["code"])
    except ApiError as error:
        return render_template("console/verify.html", form=form, errors=_field_errors(error), message=error.message), \
            error.status
    flash("Address verified: sign in.")
    return redirect(url_for("console.sign_in", email=body["email"]))


def _safe_next(target: str | None) -> str:
    # Only our own pages: never an open redirect to another site.
    if target and target.startswith("/console/") and not target.startswith("//"):
        return target
    return url_for("console.app_list")


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in():
    """Exchange address and password for the token cookies."""
    if request.method == "GET":
        return render_template("console/sign_in.html", form={"email": request.args.get("email", "")}, errors={},
                               next=request.args.get("next", ""))
    form = _form("email", "password")
    try:
        body = _load(schemas.LoginSchema, form)
        issued = users.login(body["email"], body["password"])
    except ApiError as error:
        return render_template("console/sign_in.html", form=form, errors=_field_errors(error), message=error.message,
                               next=request.form.get("next", "")), error.status
    response = redirect(_safe_next(request.form.get("next")))
    set_access_cookies(response, issued["access_token"])
    set_refresh_cookies(response, issued["refresh_token"])
    return response


@bp.post("/sign-out")
def sign_out():
    """Revoke both tokens and clear the cookies, whether or not the access token is still valid."""
    end_session()
    return redirect(url_for("console.sign_in"))


@bp.route("/forgot", methods=["GET", "POST"])
def forgot():
    """Mail a reset code (the same answer for any address)."""
    if request.method == "GET":
        return render_template("console/forgot.html", form={}, errors={})
    form = _form("email")
    try:
        body = _load(schemas.EmailSchema, form)
        users.forgot_password(body["email"])
    except ApiError as error:
        return render_template("console/forgot.html", form=form, errors=_field_errors(error), message=error.message), \
            error.status
    flash("If the address has an account, a reset code is on its way.")
    return redirect(url_for("console.reset", email=body["email"]))


@bp.route("/reset", methods=["GET", "POST"])
def reset():
    """Set a new password with the mailed code."""
    if request.method == "GET":
        return render_template("console/reset.html", form={"email": request.args.get("email", "")}, errors={})
    form = _form("email", "code", "new_password")
    try:
        body = _load(schemas.ResetPasswordSchema, form)
        users.reset_password(body["email"], body["code"], body["new_password"])
    except ApiError as error:
        return render_template("console/reset.html", form=form, errors=_field_errors(error), message=error.message), \
            error.status
    flash("Password changed: sign in with the new one.")
    return redirect(url_for("console.sign_in", email=body["email"]))


# --- apps ------------------------------------------------------------------------------------


@bp.get("/apps")
@signed_in
def app_list():
    return render_template("console/apps.html", apps=apps.list_apps(g.user_id), errors={})


def _name(form) -> str:
    """The app name through the management API's own schema."""
    return _load(manage_schemas.AppPatch, {"name": form.get("name", "").strip()})["name"]


@bp.post("/apps")
@signed_in
def app_create():
    """Create an app and show its key this once."""
    try:
        record, key = apps.add_app(apps.account(g.user_id), _name(request.form))
    except ApiError as error:
        return render_template("console/apps.html", apps=apps.list_apps(g.user_id), errors=_field_errors(error)), 422
    return _show_key(record, key, created=True)


def _show_key(record, key: str, created: bool):
    session[NEW_KEY] = {"app_id": record.id, "key": key, "created": created}
    return redirect(url_for("console.app_key", app_id=record.id))


@bp.get("/apps/<app_id>/key")
@signed_in
def app_key(app_id):
    """The key just made for the app, shown this once (never cached); after that, how to get a new one."""
    record = apps.owned_app(g.user_id, app_id)
    new = session.pop(NEW_KEY, None)
    new = new if new and new["app_id"] == record.id else {}
    response = make_response(render_template("console/key.html", app=record, key=new.get("key"),
                                             created=new.get("created")))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/apps/<app_id>")
@signed_in
def app_page(app_id):
    """One app: the live tail."""
    record = apps.owned_app(g.user_id, app_id)
    return render_template("console/tail.html", app=record, filters=_tail_filters(), levels=LEVELS)


def _tail_filters() -> dict:
    return {name: request.args.get(name, "").strip() or None for name in ("event_name", "level", "user_id")}


@bp.get("/apps/<app_id>/tail")
@signed_in
def tail_rows(app_id):
    """The newest events (an HTML fragment the tail page polls every second)."""
    record = apps.owned_app(g.user_id, app_id)
    filters = {k: v for k, v in _tail_filters().items() if v}
    if filters.get("level") not in (None, *LEVELS):
        filters.pop("level")
    rows, _ = event_queries.list_events(record.id, limit=50, **filters)
    return render_template("console/_tail_rows.html", app=record, rows=rows)


@bp.get("/apps/<app_id>/events/<path:event_id>")
@signed_in
def event_page(app_id, event_id):
    """One stored event: payload, normalised fields, validation."""
    record = apps.owned_app(g.user_id, app_id)
    event = event_queries.get_event(record.id, event_id)
    template = "console/_event.html" if request.headers.get("HX-Request") else "console/event.html"
    return render_template(template, app=record, event=event)


@bp.post("/apps/<app_id>/rename")
@signed_in
def app_rename(app_id):
    record = apps.owned_app(g.user_id, app_id)
    apps.change_app(record, {"name": _name(request.form)})
    flash(f"Renamed to {record.name}.")
    return redirect(url_for("console.app_settings", app_id=record.id))


@bp.post("/apps/<app_id>/rotate-key")
@signed_in
def app_rotate(app_id):
    """A new key, shown this once; the old one stops at once."""
    record = apps.owned_app(g.user_id, app_id)
    return _show_key(record, apps.rotate_key(record), created=False)


@bp.post("/apps/<app_id>/delete")
@signed_in
def app_delete(app_id):
    record = apps.owned_app(g.user_id, app_id)
    if request.form.get("confirm_name") != record.name:
        flash("Type the app's name exactly to delete it.")
        return redirect(url_for("console.app_settings", app_id=record.id))
    apps.delete_app(record)
    flash(f"App {record.name} deleted.")
    return redirect(url_for("console.app_list"))


@bp.get("/apps/<app_id>/settings")
@signed_in
def app_settings(app_id):
    return render_template("console/settings.html", app=apps.owned_app(g.user_id, app_id))


@bp.get("/apps/<app_id>/start")
@signed_in
def first_event(app_id):
    """Send your first event: curl, Python, OTLP variables with this app's id and host."""
    record = apps.owned_app(g.user_id, app_id)
    return render_template("console/start.html", app=record, host=request.host_url.rstrip("/"))


# --- failed events ---------------------------------------------------------------------------


@bp.get("/apps/<app_id>/failed")
@signed_in
def failed(app_id):
    record = apps.owned_app(g.user_id, app_id)
    page = lifecycle.failed_events_page(record.id, limit=100, cursor=request.args.get("cursor") or None)
    return render_template("console/failed.html", app=record, page=page)


@bp.post("/apps/<app_id>/failed/replay")
@signed_in
def failed_replay(app_id):
    """Replay one failed event (`id`) or all of them."""
    record = apps.owned_app(g.user_id, app_id)
    one = request.form.get("id")
    result = lifecycle.replay_failed_events(record.id, [one] if one else None)
    flash(f"Replaying {result['replaying']} failed event(s); stored ones leave this list.")
    return redirect(url_for("console.failed", app_id=record.id))


# --- charts ----------------------------------------------------------------------------------


@bp.get("/apps/<app_id>/charts")
@signed_in
def charts(app_id):
    """Events per bucket stacked by level, and the ingestion block, over a chosen range."""
    record = apps.owned_app(g.user_id, app_id)
    chosen = request.args.get("range") if request.args.get("range") in RANGES else "24h"
    span, bucket = RANGES[chosen]
    until = datetime.now(timezone.utc)
    stats = rollups.app_stats(record.id, bucket=bucket, since=until - span, until=until)
    return render_template("console/charts.html", app=record, stats=stats, chosen=chosen, ranges=RANGES,
                           levels=LEVELS, chart=_chart_data(stats))


def _chart_data(stats) -> dict:
    """The series summed over event names: one point per bucket of the range (empty ones 0), one count per level."""
    size = int(rollups.BUCKETS[stats["bucket"]][1].total_seconds())
    def seconds(iso):
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    first, until = seconds(stats["since"]) // size * size, seconds(stats["until"])
    times = list(range(first, until, size))
    index = {start: i for i, start in enumerate(times)}
    levels = {level: [0] * len(times) for level in LEVELS}
    for point in stats["series"]:
        i = index.get(seconds(point["start"]) // size * size)
        if i is not None:
            for level, count in point["by_level"].items():
                levels[level][i] += count
    return {"times": times, "levels": levels}


# --- rules -----------------------------------------------------------------------------------


@bp.get("/apps/<app_id>/rules")
@signed_in
def rules(app_id):
    record = apps.owned_app(g.user_id, app_id)
    return render_template("console/rules.html", app=record, rules=app_rules.list_rules(record), form={}, errors={},
                           editing=None)


@bp.get("/apps/<app_id>/rules/<rule_id>")
@signed_in
def rule_edit(app_id, rule_id):
    record = apps.owned_app(g.user_id, app_id)
    rule = app_rules.app_rule(record, rule_id)
    form = {"name": rule.name, "event_name": rule.event_name or "", "action": rule.action,
            "schema": json.dumps(rule.schema, indent=2), "enabled": rule.enabled}
    return render_template("console/rules.html", app=record, rules=app_rules.list_rules(record), form=form,
                           errors={}, editing=rule)


@bp.post("/apps/<app_id>/rules")
@bp.post("/apps/<app_id>/rules/<rule_id>")
@signed_in
def rule_save(app_id, rule_id=None):
    """Create or replace a rule from the form; errors shown next to their field."""
    record = apps.owned_app(g.user_id, app_id)
    rule = app_rules.app_rule(record, rule_id) if rule_id else None
    form = _form("name", "event_name", "action", "schema")
    form["enabled"] = request.form.get("enabled") == "on"
    try:
        try:
            schema = json.loads(form["schema"])
        except ValueError as error:
            raise ApiError(422, "invalid_request", f"schema: not JSON ({error})",
                           [{"path": "/schema", "message": f"not JSON: {error}"}]) from None
        fields = app_rules.validate_rule({"name": form["name"], "event_name": form["event_name"] or None,
                                          "action": form["action"], "schema": schema, "enabled": form["enabled"]})
        if rule is None:
            app_rules.create_rule(record, fields)
        else:
            app_rules.change_rule(rule, fields)
    except ApiError as error:
        return render_template("console/rules.html", app=record, rules=app_rules.list_rules(record), form=form,
                               errors=_field_errors(error) or {"schema": error.message}, editing=rule), 422
    flash("Rule saved.")
    return redirect(url_for("console.rules", app_id=record.id))


@bp.post("/apps/<app_id>/rules/<rule_id>/toggle")
@signed_in
def rule_toggle(app_id, rule_id):
    rule = app_rules.app_rule(apps.owned_app(g.user_id, app_id), rule_id)
    app_rules.change_rule(rule, {"enabled": not rule.enabled})
    return redirect(url_for("console.rules", app_id=app_id))
