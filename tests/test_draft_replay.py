"""scripts/draft_replay.py: replaying recorded outputs through the draft policy with pass costs."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "draft_replay.py"
spec = importlib.util.spec_from_file_location("draft_replay", SCRIPT)
replay_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(replay_mod)


def test_interpolate_between_and_beyond_measured_rows():
    cost = replay_mod.interpolate({1: 10.0, 2: 12.0, 4: 20.0})
    assert cost(1) == 10.0 and cost(2) == 12.0 and cost(4) == 20.0
    assert cost(3) == pytest.approx(16.0)  # halfway between 2 and 4
    assert cost(8) == 20.0  # flat beyond the largest measured


# a prompt whose text the answer copies: 40 distinct tokens, the answer repeats 30 of them
PROMPT = list(range(100, 140))
COPY = list(range(105, 135))


def test_free_verification_pays_for_every_right_draft():
    cost = replay_mod.interpolate({1: 1.0, 8: 1.0})  # any rows cost one pass
    perfect = replay_mod.replay([PROMPT], [COPY], cost, replay_mod.perfect_choice(cost), 7)[0]
    # 29 tokens after the first, at most 8 a pass: 4 passes
    assert perfect == pytest.approx(29 / 4)
    policy = replay_mod.replay([PROMPT], [COPY], cost, replay_mod.policy_choice(cost), 7)[0]
    assert 1.0 < policy <= perfect


def test_verification_at_full_price_never_pays():
    cost = replay_mod.interpolate({1: 1.0, 8: 8.0})  # r rows cost r passes
    perfect = replay_mod.replay([PROMPT], [COPY], cost, replay_mod.perfect_choice(cost), 7)[0]
    assert perfect == 1.0  # drafting gains nothing, so perfect lengths never draft
    policy = replay_mod.replay([PROMPT], [COPY], cost, replay_mod.policy_choice(cost), 7)[0]
    assert policy == 1.0  # and the policy sees that from the costs alone


def test_a_report_without_pass_times_is_a_clear_error(tmp_path, capsys):
    report = tmp_path / "compare.json"
    report.write_text('{"model": "tiny-random", "configs": {"default": {}}, "runs": []}')
    assert replay_mod.main([str(report)]) == 2
    assert "no pass times" in capsys.readouterr().err
