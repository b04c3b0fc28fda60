"""Verdict and Reply rules: what a plugin may return, checked where it is built."""

from __future__ import annotations

import pytest

from filterhost import Action, InvalidVerdictError, Reply, Verdict


@pytest.mark.parametrize("code", [250, 421, 451, 452])
def test_a_reject_must_be_5xx(code: int) -> None:
    status = f"{str(code)[0]}.7.1"
    with pytest.raises(InvalidVerdictError, match="a reject needs a 5xx reply"):
        Verdict(Action.REJECT, Reply(code, status, "No"))
    with pytest.raises(InvalidVerdictError):
        Verdict.reject(status, "No", code=code)


@pytest.mark.parametrize("code", [250, 550, 554])
def test_a_tempfail_must_be_4xx(code: int) -> None:
    status = f"{str(code)[0]}.7.1"
    with pytest.raises(InvalidVerdictError, match="a tempfail needs a 4xx reply"):
        Verdict(Action.TEMPFAIL, Reply(code, status, "Later"))
    with pytest.raises(InvalidVerdictError):
        Verdict.tempfail(status, "Later", code=code)


def test_the_constructors_give_the_usual_codes() -> None:
    assert Verdict.reject("5.7.1", "Virus found").reply == Reply(554, "5.7.1", "Virus found")
    assert Verdict.reject("5.1.1", "No such user", code=550).reply == Reply(
        550, "5.1.1", "No such user"
    )
    assert Verdict.tempfail("4.7.0", "Busy").reply == Reply(451, "4.7.0", "Busy")
    assert Verdict.disconnect().reply == Reply(421, "4.7.0", "Closing connection")
    for verdict in (Verdict.accept(), Verdict.discard("x"), Verdict.quarantine("x")):
        assert verdict.reply is None
        assert verdict.action.is_terminal
    assert not Action.CONTINUE.is_terminal


def test_the_enhanced_status_must_match_the_code() -> None:
    with pytest.raises(InvalidVerdictError, match=r"does not match reply code 554"):
        Verdict.reject("4.7.1", "mismatch")
    with pytest.raises(InvalidVerdictError, match="not of the form"):
        Verdict.reject("5.7", "short")
    with pytest.raises(InvalidVerdictError, match="not an SMTP code"):
        Reply(600, "5.0.0", "x")


@pytest.mark.parametrize("text", ["two\r\nlines", "bare\nlf", "nul\0"])
def test_reply_text_is_one_line(text: str) -> None:
    # A plugin must not be able to inject a second reply line (or a command) into the session.
    with pytest.raises(InvalidVerdictError, match="single line"):
        Verdict.reject("5.7.1", text)


@pytest.mark.parametrize(
    ("action", "code"),
    [
        (Action.ACCEPT, 550),
        (Action.DISCARD, 451),
        (Action.QUARANTINE, 554),
        (Action.DISCONNECT, 451),
    ],
)
def test_other_actions_need_fitting_codes(action: Action, code: int) -> None:
    with pytest.raises(InvalidVerdictError):
        Verdict(action, Reply(code, f"{str(code)[0]}.0.0", "x"))


def test_a_verdict_without_a_reply_gets_the_default_of_its_action() -> None:
    assert Verdict(Action.REJECT).effective_reply == Reply(550, "5.7.1", "Rejected by policy")
    assert Verdict(Action.TEMPFAIL).effective_reply is not None
    assert Verdict(Action.TEMPFAIL).effective_reply.code == 451  # type: ignore[union-attr]
    assert Verdict.accept().effective_reply is None


def test_by_records_the_plugin_and_keeps_the_rest() -> None:
    verdict = Verdict.reject("5.7.1", "No", reason="because")
    decided = verdict.by("spamcheck")
    assert decided.plugin == "spamcheck"
    assert (decided.action, decided.reply, decided.reason) == (
        verdict.action,
        verdict.reply,
        "because",
    )
    assert verdict.plugin is None  # frozen: the original is unchanged
