"""README's "Error codes" table names every code the application can answer, with its status."""
import re

from app.errors import HTTP_CODES
from tests.conftest import ROOT

# ApiError(status, "code", ...), error_response(status, "code", ...) and the JWT refusals
# (_refused(status, "code", ...)), a call's arguments possibly on the next line.
RAISED = re.compile(r'\b(?:ApiError|error_response|_refused)\(\s*(\d{3}),\s*"([a-z_]+)"')
ROW = re.compile(r"^\|\s*([\d /]+?)\s*\|\s*`([a-z_]+)`\s*\|", re.MULTILINE)


def raised_codes() -> dict[str, set[int]]:
    """code -> the statuses it is raised with, from every module under app/."""
    codes = {}
    for path in (ROOT / "app").rglob("*.py"):
        for status, code in RAISED.findall(path.read_text()):
            codes.setdefault(code, set()).add(int(status))
    return codes


def error_codes_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Error codes")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


def documented() -> dict[str, set[int]]:
    return {code: {int(s) for s in statuses.split("/")} for statuses, code in ROW.findall(error_codes_section())}


def test_the_scan_finds_the_codes_it_should():
    codes = raised_codes()
    # One of each way a code is raised: a one-line ApiError, one split over lines, a JWT refusal, a handler's own.
    assert codes["rule_not_found"] == {404} and codes["not_ready"] == {503}
    assert codes["missing_token"] == {401} and codes["internal_error"] == {500}
    assert len(codes) > 30


def test_every_raised_code_is_in_the_table_with_its_status():
    table = documented()
    missing = sorted(code for code in raised_codes() if code not in table)
    assert missing == [], f"README's Error codes table lacks {missing}"
    wrong = {code: (sorted(statuses), sorted(table[code])) for code, statuses in raised_codes().items()
             if not statuses <= table[code]}
    assert wrong == {}, "raised with (first) a status the table does not give (second)"


def test_every_table_row_is_a_code_the_application_answers():
    known = set(raised_codes()) | {"invalid_request"}  # also flask-smorest's 422 (app/errors.py)
    assert sorted(set(documented()) - known) == []


def test_the_codes_of_flasks_own_errors_are_named_in_the_section():
    section = error_codes_section()
    for code in set(HTTP_CODES.values()) | {"http_error"}:
        assert f"`{code}`" in section, code
