"""The web console at /ui: sign-in sessions, CSRF, roles and the API's own messages, through
the real app; then in a real browser (Debian's chromium, driven by Playwright) against
gunicorn, which also writes screenshots of the main pages to docs/screenshots/."""

import html
import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import openai
import pytest
import sqlalchemy as sa
from markupsafe import escape
from playwright.sync_api import expect, sync_playwright
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

from models import CONSOLE_SESSIONS, db, utcnow
from tests.conftest import PASSWORDS, ROOT, client_as, free_port, provider_body
from tests.fakes.model import USAGE

CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]*)"')
SECRET_KEY = "sk-console-SECRET-9137"
MODEL_KEY = "sk-model-key-console"
PROVIDERS = "/api/v1/model_providers"
CHAT = "/api/v1/openai/chat/completions"
USAGE_REPORT = "/api/v1/usage"
USAGE_SUMS = ("requests", "errors", "input_tokens", "output_tokens")


def csrf_of(page):
    return CSRF_FIELD.search(page.text).group(1)


def sign_in(client, role, password=None, form_path="/ui/sign-in", next_page=None):
    """Sign `client` in through the console's form at `form_path`, sending back the page it
    names to return to unless `next_page` is given; the answer to the form."""
    form = client.get(form_path)
    sent_back = html.unescape(re.search(r'name="next" value="([^"]*)"', form.text).group(1))
    fields = {"username": role, "password": password or PASSWORDS[role], "next": next_page or sent_back}
    return client.post(form_path.split("?")[0], data={"csrf_token": csrf_of(form), **fields})


@pytest.fixture
def console(app):
    """The console signed in as `role`: a test client holding the session cookie."""

    def signed_in(role="admin", target=app):
        client = target.test_client()
        assert sign_in(client, role).status_code == 303
        return client

    return signed_in


def post_form(client, path, form_page, **fields):
    """Submit a form of the console, with the CSRF token of the page it is on."""
    return client.post(path, data={"csrf_token": csrf_of(client.get(form_page)), **fields})


def session_cookie(client):
    return client.get_cookie("registry_console", path="/ui")


def main_text(page):
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.text.split("<main", 1)[1])).split())


# Sessions ------------------------------------------------------------------------------------


def test_signing_in_gives_an_httponly_strict_cookie_for_the_configured_hours(make_app):
    app = make_app(REGISTRY_UI_SESSION_HOURS="2")
    signed_in = sign_in(app.test_client(), "reader")
    assert signed_in.status_code == 303 and signed_in.headers["Location"] == "/ui/providers"
    cookie = next(value for value in signed_in.headers.getlist("Set-Cookie") if value.startswith("registry_console="))
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "max-age", "path"} <= attributes and "secure" not in attributes
    assert "Max-Age=7200" in cookie and "Path=/ui" in cookie and "SameSite=Strict" in cookie

    over_https = sign_in(app.test_client(), "reader", form_path="https://localhost/ui/sign-in")
    assert "Secure" in next(value for value in over_https.headers.getlist("Set-Cookie") if "registry_console=" in value)


def test_pages_need_a_session_and_sign_in_returns_to_the_page_asked(app):
    client = app.test_client()
    asked = client.get("/ui/catalog")
    assert asked.status_code == 303 and asked.headers["Location"] == "/ui/sign-in?next=/ui/catalog"
    signed_in = sign_in(client, "reader", form_path=asked.headers["Location"])
    assert signed_in.headers["Location"] == "/ui/catalog"
    assert client.get("/ui/catalog").status_code == 200


@pytest.mark.parametrize("target", ["https://elsewhere.example/ui/", "//elsewhere.example/ui/", "/api/v1/tokens"])
def test_sign_in_sends_nobody_outside_the_console(app, target):
    signed_in = sign_in(app.test_client(), "reader", form_path=f"/ui/sign-in?next={quote(target)}")
    assert signed_in.headers["Location"] == "/ui/providers"


def test_a_wrong_password_signs_nobody_in(app):
    client = app.test_client()
    refused = sign_in(client, "admin", password="not-the-password")
    assert refused.status_code == 401 and "Wrong user name or password." in refused.text
    assert client.get("/ui/providers").status_code == 303


def test_signing_out_ends_the_session_on_the_server(app, console):
    client = console("admin")
    copied = session_cookie(client).value
    signed_out = post_form(client, "/ui/sign-out", "/ui/providers")
    assert signed_out.status_code == 303 and signed_out.headers["Location"] == "/ui/sign-in?notice=signed-out"
    thief = app.test_client()
    thief.set_cookie("registry_console", copied, path="/ui")
    assert thief.get("/ui/providers").status_code == 303
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(CONSOLE_SESSIONS)) == 0


def test_an_expired_session_signs_in_no_more(app, console):
    client = console("reader")
    with app.app_context():
        db.session.execute(sa.update(CONSOLE_SESSIONS).values(expires_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
    assert client.get("/ui/providers").status_code == 303


def test_a_new_password_or_role_counts_from_the_next_page(app, console):
    admin, reader = console("admin"), console("reader")
    assert admin.get("/ui/audit").status_code == 200
    runner = app.test_cli_runner()
    assert runner.invoke(args=["users", "set-role", "admin", "reader"]).exit_code == 0
    assert admin.get("/ui/audit").status_code == 403
    assert (
        runner.invoke(args=["users", "set-password", "reader", "--password-stdin"], input="new-pass-2\n").exit_code == 0
    )
    assert reader.get("/ui/providers").status_code == 303
    assert sign_in(app.test_client(), "reader", password="new-pass-2").status_code == 303


def test_failed_sign_ins_count_with_the_apis_failed_logins(make_app):
    app = make_app(REGISTRY_LOGIN_FAILURES="3")
    for _ in range(3):
        assert sign_in(app.test_client(), "service", password="wrong").status_code == 401
    refused = app.test_client().get(PROVIDERS, auth=("service", PASSWORDS["service"]))
    assert refused.status_code == 429 and refused.headers["Retry-After"]

    for _ in range(3):
        assert app.test_client().get(PROVIDERS, auth=("reader", "wrong")).status_code == 401
    limited = sign_in(app.test_client(), "reader")
    assert limited.status_code == 429 and limited.headers["Retry-After"]
    assert "Too many failed logins" in limited.text


# Forms: CSRF, roles, the API's rules -------------------------------------------------------


def test_a_post_without_the_forms_csrf_token_is_refused(app, console):
    client = console("admin")
    for token in ({}, {"csrf_token": "0" * 64}):
        refused = client.post("/ui/tokens", data={"name": "forged", **token})
        assert refused.status_code == 403 and refused.mimetype == "text/html"
    other_session = csrf_of(console("admin").get("/ui/tokens"))
    assert client.post("/ui/tokens", data={"name": "forged", "csrf_token": other_session}).status_code == 403
    assert client_as(app, "admin").get("/api/v1/tokens").get_json()["total_count"] == 0

    stranger = app.test_client()
    stranger.get("/ui/sign-in")  # a sign-in cookie, but no token from its form
    forged_sign_in = stranger.post("/ui/sign-in", data={"username": "admin", "password": PASSWORDS["admin"]})
    assert forged_sign_in.status_code == 403 and session_cookie(stranger) is None


def test_a_reader_sees_no_admin_action_and_is_refused_one(app, console):
    created = client_as(app, "admin").post(PROVIDERS, json=provider_body())
    provider_id = created.get_json()["id"]
    reader = console("reader")
    providers = reader.get("/ui/providers")
    assert "Add a provider" not in providers.text and "Audit log" not in providers.text
    page = reader.get(f"/ui/providers/{provider_id}")
    assert page.status_code == 200
    for admin_action in ("/check", "/refresh", "/delete", "/edit", "Check now", "Save"):
        assert admin_action not in page.text
    assert "default_llm_model" not in reader.get("/ui/catalog").text

    for path in (f"/ui/providers/{provider_id}/delete", f"/ui/providers/{provider_id}/check", "/ui/providers/new"):
        refused = post_form(reader, path, "/ui/providers", **provider_body(base_url="https://other.example/v1"))
        assert refused.status_code == 403 and "Your role does not allow this operation." in refused.text
    assert reader.get("/ui/audit").status_code == 403
    assert client_as(app, "admin").get(PROVIDERS).get_json()["total_count"] == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"base_url": "ftp://files.example"},
        {"type": "watsonx"},
        {"watsonx_space_id": "space-1"},
        {"name": "x" * 1025},
        {"type": "not-a-type"},
    ],
    ids=["scheme", "watsonx without an id", "watsonx id on openai", "long name", "unknown type"],
)
def test_bad_input_is_refused_with_the_apis_messages(app, console, fields):
    body = provider_body(api_key=SECRET_KEY, **fields)
    api_errors = client_as(app, "admin").post(PROVIDERS, json=body).get_json()["errors"]
    form = {name: value for name, value in body.items() if value is not None}
    refused = post_form(console("admin"), "/ui/providers/new", "/ui/providers/new", **form)
    assert refused.status_code == 422
    for field, messages in api_errors.items():
        assert f"<code>{field}</code>: {escape(' '.join(messages))}" in refused.text
    assert SECRET_KEY not in refused.text


def test_a_taken_base_url_is_the_apis_409(app, console):
    client_as(app, "admin").post(PROVIDERS, json=provider_body())
    api_conflict = client_as(app, "admin").post(PROVIDERS, json=provider_body()).get_json()["detail"]
    form = {name: value for name, value in provider_body().items() if value is not None}
    refused = post_form(console("admin"), "/ui/providers/new", "/ui/providers/new", **form)
    assert refused.status_code == 409 and api_conflict in main_text(refused)


def etag_in(page):
    return html.unescape(re.search(r'name="etag" value="([^"]*)"', page.text).group(1))


def test_an_admin_adds_edits_checks_and_deletes_without_the_key_ever_shown(app, console, fake_upstream):
    upstream = fake_upstream(api_key=SECRET_KEY)
    admin = console("admin")
    fields = provider_body(base_url=upstream.base_url, api_key=SECRET_KEY, name="Before")
    form = {name: value for name, value in fields.items() if value is not None}
    added = post_form(admin, "/ui/providers/new", "/ui/providers/new", **form)
    assert added.status_code == 303
    page_path = added.headers["Location"].split("?")[0]
    provider_id = page_path.rsplit("/", 1)[1]
    assert "The provider was added." in admin.get(added.headers["Location"]).text

    edit = {"base_url": upstream.base_url, "name": "After", "description": "", "etag": etag_in(admin.get(page_path))}
    edited = post_form(admin, f"{page_path}/edit", page_path, **edit)
    assert edited.status_code == 303
    shown = client_as(app, "admin").get(f"{PROVIDERS}/{provider_id}").get_json()
    assert (shown["name"], shown["description"]) == ("After", None)

    stale_page = admin.get(page_path)
    assert post_form(admin, f"{page_path}/check", page_path).status_code == 303  # a probe changes the ETag
    stale_edit = admin.post(
        f"{page_path}/edit", data={"csrf_token": csrf_of(stale_page), "etag": etag_in(stale_page), "name": "Stale"}
    )
    assert stale_edit.status_code == 412 and "read it again" in main_text(stale_edit)
    checked = main_text(admin.get(page_path))  # the check listed the upstream's models
    assert "3 listed" in checked and "openai:gpt-4o-mini" in checked

    for page in ("/ui/providers", page_path, "/ui/catalog", "/ui/audit"):
        assert SECRET_KEY not in admin.get(page).text
    events = client_as(app, "admin").get("/api/v1/audit", query_string={"target_id": provider_id}).get_json()
    assert [event["action"] for event in events["items"]] == ["provider.check", "provider.update", "provider.create"]
    assert {event["user"] for event in events["items"]} == {"admin"}

    deleted = post_form(admin, f"{page_path}/delete", page_path, etag=etag_in(admin.get(page_path)))
    assert deleted.status_code == 303 and client_as(app, "admin").get(PROVIDERS).get_json()["total_count"] == 0


def test_the_providers_page_filters_and_shows_state_models_and_errors(app, console):
    admin_api = client_as(app, "admin")
    openai_id = admin_api.post(PROVIDERS, json=provider_body(name="Alpha-provider")).get_json()["id"]
    voyage = provider_body(type="voyage", base_url="https://api.voyageai.com/v1", name="Beta-provider")
    admin_api.post(PROVIDERS, json=voyage)
    with app.app_context():
        db.session.execute(
            sa.text("UPDATE model_providers SET state='offline', last_error='Connection refused' WHERE id=:id"),
            {"id": openai_id},
        )
        db.session.commit()
    reader = console("reader")
    every = main_text(reader.get("/ui/providers"))
    assert "Alpha-provider" in every and "Beta-provider" in every
    assert "offline" in every and "Connection refused" in every
    embedding = main_text(reader.get("/ui/providers", query_string={"capability": "embedding", "type": ""}))
    assert "Alpha-provider" in embedding and "Beta-provider" in embedding
    llm = main_text(reader.get("/ui/providers", query_string={"capability": "llm"}))
    assert "Alpha-provider" in llm and "Beta-provider" not in llm
    offline = main_text(reader.get("/ui/providers", query_string={"state": "offline"}))
    assert "Alpha-provider" in offline and "Beta-provider" not in offline
    refused = reader.get("/ui/providers", query_string={"state": "sleepy"})
    assert refused.status_code == 422 and "state : Must be one of: online, offline." in main_text(refused)


def test_a_token_secret_is_shown_once_and_revoked_tokens_stop_working(app, console):
    client = console("service")
    made = post_form(client, "/ui/tokens", "/ui/tokens", name="agent", role="caller", expires_in_days="30")
    assert made.status_code == 201 and made.headers["Cache-Control"] == "no-store"
    secret = re.search(r'value="(mpr_[^"]+)"', made.text).group(1)
    listed = client_as(app, "service").get("/api/v1/tokens").get_json()["items"]
    assert [(token["name"], token["role"]) for token in listed] == [("agent", "caller")]
    assert secret not in client.get("/ui/tokens").text

    bearer = app.test_client()
    assert bearer.get(PROVIDERS, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    too_high = post_form(client, "/ui/tokens", "/ui/tokens", name="root", role="admin")
    assert too_high.status_code == 403 and "A token's role is at most its owner's" in main_text(too_high)
    revoked = post_form(client, f"/ui/tokens/{listed[0]['id']}/revoke", "/ui/tokens")
    assert revoked.status_code == 303
    assert bearer.get(PROVIDERS, headers={"Authorization": f"Bearer {secret}"}).status_code == 401


def test_a_token_is_made_with_limits_and_listed_with_them(app, console):
    client = console("service")
    limits = {"requests_per_minute": "60", "max_parallel": "2", "tokens_per_minute": "", "tokens_per_day": ""}
    made = post_form(client, "/ui/tokens", "/ui/tokens", name="agent", role="caller", **limits)
    assert made.status_code == 201
    [listed] = client_as(app, "service").get("/api/v1/tokens").get_json()["items"]
    assert listed["limits"] == {
        "requests_per_minute": 60,
        "tokens_per_minute": None,
        "tokens_per_day": None,
        "max_parallel": 2,
    }
    assert "agent caller" in main_text(made) and "Requests per minute 60, Calls at once 2" in main_text(made)

    refused = post_form(client, "/ui/tokens", "/ui/tokens", name="greedy", **{**limits, "max_parallel": "0"})
    assert refused.status_code == 422
    assert re.search(r'id="max_parallel"[^>]*aria-invalid="true"', refused.text)
    assert "Must be greater than or equal to 1" in main_text(refused)
    assert len(client_as(app, "service").get("/api/v1/tokens").get_json()["items"]) == 1


def test_an_admin_sets_the_default_models_with_the_apis_rules(app, console):
    admin = console("admin")
    saved = post_form(admin, "/ui/catalog/defaults", "/ui/catalog", default_llm_model="openai:gpt-4o")
    assert saved.status_code == 303
    configuration = client_as(app, "reader").get("/api/v1/configurations/system").get_json()
    assert (configuration["default_llm_model"], configuration["default_embedding_model"]) == ("openai:gpt-4o", None)
    assert 'value="openai:gpt-4o"' in admin.get("/ui/catalog").text

    api_errors = client_as(app, "admin").put("/api/v1/configurations/system", json={"default_llm_model": "gpt-4o"})
    refused = post_form(admin, "/ui/catalog/defaults", "/ui/catalog", default_llm_model="gpt-4o")
    assert refused.status_code == 422
    message = " ".join(api_errors.get_json()["errors"]["default_llm_model"])
    assert f"<code>default_llm_model</code>: {escape(message)}" in refused.text


USAGE_PAGE = "/ui/usage"


@pytest.fixture
def calls_by_two(registry, fake_upstream):
    """Through the gateway: two calls by service (a known model, with a reader's token listed
    apart) and one by admin to a model that is not there; all written to the usage table."""
    upstream = fake_upstream(api_key=MODEL_KEY)
    body = provider_body(base_url=upstream.base_url, api_key=MODEL_KEY)
    assert client_as(registry, "admin").post(PROVIDERS, json=body).status_code == 201
    chat = {"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
    for _ in range(2):
        assert client_as(registry, "service").post(CHAT, json=chat).status_code == 200
    assert client_as(registry, "admin").post(CHAT, json={**chat, "model": "openai:gone"}).status_code == 404
    assert registry.extensions["usage"].flush()


def test_the_usage_page_shows_the_apis_table_and_a_chart_of_tokens_per_day_by_model(registry, console, calls_by_two):
    today, tokens = utcnow().date().isoformat(), USAGE["prompt_tokens"] + USAGE["completion_tokens"]
    admin = console("admin", target=registry)
    assert 'href="/ui/usage"' in admin.get("/ui/providers").text
    page = admin.get(USAGE_PAGE, query_string={"group_by": "user,model"})
    assert page.status_code == 200
    api_rows = client_as(registry, "admin").get(USAGE_REPORT, query_string={"group_by": "user,model"}).get_json()
    shown = main_text(page)
    for row in api_rows["items"]:
        cells = [row["user"], row["model"] or "none", *(str(row[sum_]) for sum_ in USAGE_SUMS)]
        assert " ".join(cells) in shown
    assert f"service openai:gpt-4o 2 0 {2 * USAGE['prompt_tokens']} {2 * USAGE['completion_tokens']}" in shown
    svg = page.text.split("<svg", 1)[1].split("</svg>", 1)[0]
    assert 'role="img"' in svg and "<title" in svg and "Tokens per day by model" in shown
    assert f"<title>{today}, openai:gpt-4o: {2 * tokens} tokens</title>" in svg
    assert MODEL_KEY not in page.text
    assert svg.count("<rect") == 1 and "openai:gpt-4o" in page.text.split('class="legend"', 1)[1]

    by_day = main_text(admin.get(USAGE_PAGE))  # the API's default: by day, the last 30 days
    assert f"{today} 3 1 {2 * USAGE['prompt_tokens']} {2 * USAGE['completion_tokens']}" in by_day
    assert "No call in this range." in main_text(admin.get(USAGE_PAGE, query_string={"until": "2020-01-01T00:00:00Z"}))


def test_the_usage_page_shows_each_role_only_what_the_api_shows_it(registry, console, calls_by_two):
    service = main_text(console("service", target=registry).get(USAGE_PAGE, query_string={"group_by": "user"}))
    assert "service 2 0" in service and "admin" not in service.split("Calls and tokens", 1)[1]
    reader = console("reader", target=registry)
    mine = main_text(reader.get(USAGE_PAGE, query_string={"group_by": "user"}))
    assert "No tokens in this range." in mine and "No call in this range." in mine and "openai:gpt-4o" not in mine
    refused = reader.get(USAGE_PAGE, query_string={"user": "service"})
    api_refusal = client_as(registry, "reader").get(USAGE_REPORT, query_string={"user": "service"}).get_json()
    assert refused.status_code == 403 and api_refusal["detail"] in main_text(refused)


@pytest.mark.parametrize("query", [{"group_by": "day,week"}, {"since": "yesterday"}], ids=["group", "since"])
def test_a_bad_usage_filter_shows_the_apis_message(registry, console, query):
    api_refusal = client_as(registry, "admin").get(USAGE_REPORT, query_string=query).get_json()
    refused = console("admin", target=registry).get(USAGE_PAGE, query_string=query)
    assert refused.status_code == 422 and api_refusal["detail"] in main_text(refused)
    [(field, messages)] = api_refusal["errors"].items()
    assert field in query and f"<code>{field}</code>: {escape(' '.join(messages))}" in refused.text


def test_the_console_works_under_a_mount_path(app):
    def host_app(environ, start_response):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"the host application"]

    browser = Client(DispatcherMiddleware(host_app, {"/registry": app}))
    asked = browser.get("/registry/ui/tokens")
    assert asked.headers["Location"] == "/registry/ui/sign-in?next=/registry/ui/tokens"
    form = browser.get(asked.headers["Location"])
    assert 'action="/registry/ui/sign-in"' in form.text and 'href="/registry/ui/static/console.css"' in form.text
    signed_in = sign_in(browser, "reader", form_path=asked.headers["Location"])
    assert signed_in.headers["Location"] == "/registry/ui/tokens"
    assert "Path=/registry/ui" in signed_in.headers["Set-Cookie"]
    tokens = browser.get("/registry/ui/tokens")
    assert tokens.status_code == 200 and "/registry/api/v1/openai" in tokens.text
    assert browser.get("/registry/ui/static/console.js").status_code == 200


def test_a_database_gone_is_a_503_page_not_a_500(app, console, databases, instance_path):
    client = console("admin")
    with app.app_context():
        db.engine.dispose()
    databases.destroy(instance_path)
    for answer in (client.get("/ui/providers"), sign_in(app.test_client(), "reader")):
        assert answer.status_code == 503 and answer.mimetype == "text/html"
        assert "The database is not available" in main_text(answer)


def test_pages_load_only_the_registrys_own_files(console):
    client = console("admin")
    for path in ("/ui/providers", "/ui/providers/new", "/ui/catalog", "/ui/tokens", "/ui/audit"):
        page = client.get(path)
        assert page.status_code == 200
        assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
        for link in re.findall(r'(?:src|href|action)="([^"]*)"', page.text):
            assert link.startswith(("/", "#")) and not link.startswith("//"), (path, link)


# In a real browser --------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(ROOT) / "docs" / "screenshots"
WIDTHS = (1280, 360)


@pytest.fixture(scope="module")
def browser():
    """One chromium for the module: Debian's (`make test` installs it when missing)."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


class RecordedPage:
    """A page in its own browser context, every request it makes recorded."""

    def __init__(self, browser, server, width=1280, javascript=True):
        self.server = server
        self.context = browser.new_context(
            base_url=server.base_url, viewport={"width": width, "height": 900}, java_script_enabled=javascript
        )
        self.page = self.context.new_page()
        self.requested = []
        self.page.on("request", lambda request: self.requested.append(request.url))
        self.page.on("dialog", lambda dialog: dialog.accept())

    def outside_requests(self):
        return [url for url in self.requested if not url.startswith(self.server.base_url + "/")]

    def sign_in(self, role):
        self.page.goto("/ui/")
        self.page.get_by_label("User name").fill(role)
        self.page.get_by_label("Password").fill(PASSWORDS[role])
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.get_by_role("heading", name="Providers")).to_be_visible()

    def follow_nav(self, label):
        self.page.get_by_role("navigation", name="Console").get_by_role("link", name=label).click()

    def screenshot(self, name):
        """The page at each width into docs/screenshots/; the narrow one must not scroll sideways."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for width in WIDTHS:
            self.page.set_viewport_size({"width": width, "height": 300})  # the image as tall as the page
            self.page.screenshot(path=SCREENSHOTS / f"{name}-{width}.png", full_page=True)
            overflow = self.page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{name} scrolls sideways at {width} px"
        self.page.set_viewport_size({"width": WIDTHS[0], "height": 900})

    def close(self):
        self.context.close()


@pytest.fixture
def open_page(browser):
    pages = []

    def open_(server, **options):
        page = RecordedPage(browser, server, **options)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.close()


def test_in_a_browser_an_admin_adds_a_provider_and_a_token_that_the_openai_client_uses(
    start_gunicorn, fake_upstream, open_page
):
    upstream = fake_upstream(api_key=MODEL_KEY)
    server = start_gunicorn(workers=1, REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_PROBE_FAILURES="1")
    with server.client("admin") as admin_api:  # a provider whose upstream went away: nothing listens there
        gone = provider_body(base_url=f"http://127.0.0.1:{free_port()}/v1", name="Retired models")
        gone_id = admin_api.post(PROVIDERS, json=gone, params={"verify": "false"}).json()["id"]
        assert admin_api.post(f"{PROVIDERS}/{gone_id}/check").json()["state"] == "offline"
    admin = open_page(server)
    page = admin.page
    admin.sign_in("admin")

    page.get_by_role("link", name="Add a provider").click()
    page.get_by_label("Type").select_option("openai")
    page.get_by_label("Base URL").fill(upstream.base_url)
    page.get_by_label("API key").fill(MODEL_KEY)
    page.get_by_label("Name").fill("Local models")
    page.get_by_role("button", name="Add the provider").click()
    expect(page.get_by_role("status")).to_have_text("The provider was added.")
    page.get_by_role("button", name="Check now").click()
    expect(page.get_by_role("status")).to_have_text("The provider was checked just now.")
    expect(page.locator(".heading .state")).to_have_text("online")
    expect(page.get_by_role("rowheader", name="openai:gpt-4o", exact=True)).to_be_visible()
    admin.screenshot("provider")
    admin.follow_nav("Providers")
    expect(page.get_by_role("row", name=re.compile("Local models"))).to_contain_text("online")
    expect(page.get_by_role("row", name=re.compile("Retired models"))).to_contain_text("offline")
    expect(page.get_by_role("row", name=re.compile("Retired models"))).to_contain_text("refused")
    admin.screenshot("providers")
    admin.follow_nav("Catalog")
    expect(page.get_by_role("rowheader", name="openai:gpt-4o", exact=True)).to_be_visible()
    admin.screenshot("catalog")

    admin.follow_nav("Tokens")
    page.get_by_label("Name").fill("my-agent")
    page.get_by_label("Role").select_option("caller")
    page.get_by_role("button", name="Make the token").click()
    secret = page.get_by_label("The new token").input_value()
    page.get_by_role("button", name="Copy").click()
    expect(page.locator("#copy-status")).to_have_text("Copied to the clipboard.")
    admin.screenshot("token-made")

    with openai.OpenAI(base_url=f"{server.base_url}/api/v1/openai", api_key=secret, max_retries=0) as agent:
        answer = agent.chat.completions.create(model="openai:gpt-4o", messages=[{"role": "user", "content": "Hi"}])
        assert answer.choices[0].message.content == "Hello!"
        admin.follow_nav("Usage")  # the call's usage event is written within a second of its end
        legend = page.get_by_role("list", name="Models")
        for _ in range(20):
            if legend.count() and "openai:gpt-4o" in legend.inner_text():
                break
            page.wait_for_timeout(250)
            page.reload()
        expect(legend).to_contain_text("openai:gpt-4o")
        expect(page.get_by_role("img", name=re.compile("tokens per day"))).to_be_visible()
        admin.screenshot("usage")
        admin.follow_nav("Tokens")
        page.get_by_role("button", name="Revoke my-agent").click()
        expect(page.get_by_role("status")).to_have_text("The token was revoked; it no longer works.")
        with pytest.raises(openai.AuthenticationError):
            agent.models.list()

    admin.follow_nav("Audit log")
    expect(page.get_by_role("rowheader", name="token.revoke")).to_be_visible()
    admin.screenshot("audit")
    assert MODEL_KEY not in page.content()
    assert admin.outside_requests() == []


def test_in_a_browser_a_reader_signs_in_by_keyboard_without_javascript_and_sees_no_admin_action(
    start_gunicorn, open_page
):
    server = start_gunicorn(workers=1)
    with server.client("admin") as admin_api:
        provider_id = admin_api.post(PROVIDERS, json=provider_body(name="Shared")).json()["id"]
    reader = open_page(server, javascript=False)
    page = reader.page
    page.goto("/ui/")
    reader.screenshot("sign-in")
    for _ in range(5):  # the skip link, the registry's name, then the form
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "username":
            break
    page.keyboard.type("reader")
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORDS["reader"])
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Providers")).to_be_visible()

    expect(page.get_by_role("link", name="Add a provider")).to_have_count(0)
    expect(page.get_by_role("link", name="Audit log")).to_have_count(0)
    page.get_by_role("link", name="Shared").click()
    expect(page.get_by_role("heading", name="Shared")).to_be_visible()
    expect(page.get_by_role("button")).to_have_text(["Sign out"])  # the only button: no admin action

    reader.follow_nav("Tokens")
    page.get_by_label("Name").fill("read-only")
    page.get_by_role("button", name="Make the token").click()
    assert page.get_by_label("The new token").input_value().startswith("mpr_")
    expect(page.get_by_role("button", name="Copy")).to_be_hidden()  # a script's enhancement only
    assert page.goto(f"/ui/providers/{provider_id}").status == 200
    assert reader.outside_requests() == []


def test_in_a_browser_a_post_without_the_csrf_token_is_refused(start_gunicorn, open_page):
    server = start_gunicorn(workers=1)
    admin = open_page(server)
    admin.sign_in("admin")
    forged = admin.context.request.post(f"{server.base_url}/ui/tokens", form={"name": "forged"})
    assert forged.status == 403 and "not sent from this console" in forged.text()
    with server.client("admin") as admin_api:
        assert admin_api.get("/api/v1/tokens").json()["total_count"] == 0
