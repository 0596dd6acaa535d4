"""`flask --app app users ...`: the operator's user commands, and roles over HTTP."""

import pytest

from tests.conftest import basic_auth, provider_body


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def run(*args, input=None):
        return runner.invoke(args=["users", *args], input=input)

    return run


def can_list(app, username, password):
    response = app.test_client().get(
        "/api/v1/model_providers", headers={"Authorization": basic_auth(username, password)}
    )
    return response.status_code


def test_create_with_password_from_stdin_then_authenticate(app, cli):
    result = cli("create", "ci-bot", "--role", "service", "--password-stdin", input="bot-secret\n")
    assert result.exit_code == 0, result.output
    assert can_list(app, "ci-bot", "bot-secret") == 200
    assert can_list(app, "ci-bot", "wrong") == 401


def test_create_with_prompted_password(app, cli):
    result = cli("create", "alice", "--role", "reader", input="alice-pw\nalice-pw\n")
    assert result.exit_code == 0, result.output
    assert "alice-pw" not in result.output
    assert can_list(app, "alice", "alice-pw") == 200


def test_roles_decide_what_a_user_may_do(app, cli):
    cli("create", "bob", "--role", "reader", "--password-stdin", input="pw\n")
    response = app.test_client().post(
        "/api/v1/model_providers", json=provider_body(), headers={"Authorization": basic_auth("bob", "pw")}
    )
    assert response.status_code == 403


def test_list_shows_names_and_roles(cli):
    output = cli("list").output
    assert "admin\tadmin" in output and "reader\treader" in output and "service\tservice" in output


def test_caller_role_may_read_but_not_resolve(app, cli):
    assert cli("create", "agent", "--role", "caller", "--password-stdin", input="pw\n").exit_code == 0
    assert can_list(app, "agent", "pw") == 200
    resolved = app.test_client().post(
        "/api/v1/model_providers/resolve",
        json={"model": "openai:gpt-4o"},
        headers={"Authorization": basic_auth("agent", "pw")},
    )
    assert resolved.status_code == 403


def test_set_role_changes_what_a_user_may_do(app, cli):
    result = cli("set-role", "reader", "admin")
    assert result.exit_code == 0, result.output
    assert "reader\tadmin" in cli("list").output
    created = app.test_client().post(
        "/api/v1/model_providers",
        json=provider_body(),
        headers={"Authorization": basic_auth("reader", "reader-pass-1")},
    )
    assert created.status_code == 201
    assert cli("set-role", "reader", "owner").exit_code != 0
    assert cli("set-role", "nobody", "reader").exit_code != 0


def test_duplicate_user_and_bad_role_are_refused(cli):
    assert cli("create", "admin", "--role", "admin", "--password-stdin", input="x\n").exit_code != 0
    assert cli("create", "carol", "--role", "owner", "--password-stdin", input="x\n").exit_code != 0
    assert cli("create", "dave", "--role", "reader", "--password-stdin", input="\n").exit_code != 0


@pytest.mark.parametrize(
    "username",
    [
        "u" * 256,
        "with:colon",
        "surrogate\udc80",
        "new\nline",
        "tab\tbed",
        "\x1b[31mred",
        "bell\x07",
        "c1\x9bcontrol",
        "right\u202eto-left",
        "zero\u200bwidth",
        "line\u2028separator",
    ],
)
def test_user_name_the_database_or_basic_auth_cannot_hold_or_a_terminal_shows_wrongly_is_refused(cli, username):
    result = cli("create", username, "--role", "reader", "--password-stdin", input="pw\n")
    assert result.exit_code == 1
    assert "A user name is 1 to 255 characters, without ':' or control characters." in result.output
    assert cli("list").output.count("\t") == 3  # the three users of the fixture, no other


CAFE_NFC, CAFE_NFD = "caf\u00e9", "cafe\u0301"


def test_user_names_are_one_user_however_their_accents_were_typed(app, cli):
    assert cli("create", CAFE_NFD, "--role", "reader", "--password-stdin", input="pw\n").exit_code == 0
    assert CAFE_NFC + "\treader" in cli("list").output.splitlines()
    again = cli("create", CAFE_NFC, "--role", "admin", "--password-stdin", input="pw\n")
    assert again.exit_code == 1 and "already exists" in again.output
    assert can_list(app, CAFE_NFC, "pw") == 200
    assert can_list(app, CAFE_NFD, "pw") == 200
    assert cli("set-password", CAFE_NFC, "--password-stdin", input="pw2\n").exit_code == 0
    assert can_list(app, CAFE_NFD, "pw2") == 200
    assert cli("delete", CAFE_NFD).exit_code == 0
    assert can_list(app, CAFE_NFC, "pw2") == 401


def test_login_with_control_characters_in_the_name_is_401(app):
    assert can_list(app, "reader\x00", "reader-pass-1") == 401
    assert can_list(app, "reader\n", "reader-pass-1") == 401
    assert can_list(app, "reader", "reader-pass-1") == 200


def test_commands_on_an_unknown_user_name_it_as_typed_and_ask_for_no_password(cli):
    for name in ("nobody", "nobody\x01"):
        for command in (["set-password", name], ["delete", name], ["set-role", name, "reader"]):
            result = cli(*command, input="never-read\n")
            assert result.exit_code == 1
            assert f"No user named {name!r}" in result.output
            assert "Password" not in result.output


def test_set_password_takes_effect_on_the_next_request(app, cli):
    assert can_list(app, "reader", "reader-pass-1") == 200
    result = cli("set-password", "reader", "--password-stdin", input="new-reader-pw\n")
    assert result.exit_code == 0, result.output
    assert can_list(app, "reader", "new-reader-pw") == 200  # a new password works at once, the old one no more
    assert can_list(app, "reader", "reader-pass-1") == 401
    assert can_list(app, "reader", "new-reader-pw") == 200


def test_delete_takes_effect_on_the_next_request(app, cli):
    assert can_list(app, "reader", "reader-pass-1") == 200
    assert cli("delete", "reader").exit_code == 0
    assert can_list(app, "reader", "reader-pass-1") == 401
    assert cli("delete", "reader").exit_code != 0


def test_recreated_user_does_not_inherit_a_cached_password(app, cli):
    assert can_list(app, "reader", "reader-pass-1") == 200
    cli("delete", "reader")
    cli("create", "reader", "--role", "reader", "--password-stdin", input="another\n")
    assert can_list(app, "reader", "reader-pass-1") == 401
