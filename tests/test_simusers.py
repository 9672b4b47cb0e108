import random

import pytest

from metarlhf.errors import ConfigError, DataError
from metarlhf.simusers import (
    HELDOUT_USERS,
    TRAIN_USERS,
    USERS,
    SimUser,
    bullets_reward,
    get_users,
    length_reward,
    load_users_file,
    numbered_reward,
)


def test_library_size_families_and_split():
    assert len(USERS) >= 12
    assert len({u.family for u in USERS.values()}) >= 5
    assert set(TRAIN_USERS).isdisjoint(HELDOUT_USERS)
    assert set(TRAIN_USERS) | set(HELDOUT_USERS) == set(USERS)
    train_families = {USERS[n].family for n in TRAIN_USERS}
    assert all(USERS[n].family in train_families for n in HELDOUT_USERS)


def test_rewards_on_hand_made_texts():
    assert length_reward(10)("q", "one two three four five six seven eight nine ten") == 0.0
    assert length_reward(10)("q", "one two three four five") == -0.5
    assert bullets_reward("q", "Tips:\n- a\n- b\n* c") == 3
    assert numbered_reward("q", "1. a\n2. b\n- c") == 1.5
    assert USERS["enthusiastic"].reward("q", "Great! Amazing!") == 4
    assert USERS["asks-back"].reward("q", "Why? Really?") == 2
    assert USERS["theme-music"].reward("q", "Listen to a song") == 2
    assert USERS["formal"].reward("q", "However, it's fine!") == 0.0


def test_thumbs_above_median_up_and_ties_use_threshold():
    u = USERS["bullets"]
    recs = u.thumbs("p", ["- a\n- b", "plain", "- one"])
    assert [r.label for r in recs] == [1, 0, 0]
    assert all(r.user_id == "bullets" and r.prompt == "p" for r in recs)
    tied = u.thumbs("p", ["x", "y"])
    assert [r.label for r in tied] == [0, 0]  # 0 bullets is not above the 0.0 bar


def test_label_noise_flips_about_the_right_share():
    u = USERS["bullets"]
    rng = random.Random(1)
    flips = 0
    for _ in range(400):
        a, b = u.thumbs("p", ["- a", "b"], noise=0.3, rng=rng)
        flips += a.label == 0
    assert 0.22 < flips / 400 < 0.38
    with pytest.raises(ConfigError):
        u.thumbs("p", ["a", "b"], noise=0.9)


def test_pair_prefers_higher_reward():
    pr = USERS["concise-15"].pair("p", "word " * 40, "word " * 14)
    assert pr.chosen.count("word") == 14 and pr.rejected.count("word") == 40


def test_get_users_unknown_name():
    with pytest.raises(ConfigError, match="unknown simulated user"):
        get_users(["bullets", "nobody"])


def test_load_users_file(tmp_path):
    f = tmp_path / "users.py"
    f.write_text("USERS = {'likes-x': lambda p, c: c.count('x'), 'short': lambda p, c: -len(c)}\n")
    users = load_users_file(f)
    assert set(users) == {"likes-x", "short"}
    assert users["likes-x"].reward("p", "xx") == 2.0
    assert isinstance(users["short"], SimUser)


@pytest.mark.parametrize(
    "text,match",
    [
        ("def broken(:\n", "error while importing"),
        ("X = 1\n", "must define a non-empty dict USERS"),
        ("USERS = {'a': 3}\n", "not callable"),
        ("USERS = {'a': lambda p, c: 'nope'}\n", "must return a number"),
        ("USERS = {'a': lambda p: 1.0}\n", "must return a number"),
        ("USERS = {'numbered': lambda p, c: 1.0}\n", "built-in simulated users"),  # would replace the held-out one
    ],
)
def test_load_users_file_errors(tmp_path, text, match):
    f = tmp_path / "u.py"
    f.write_text(text)
    with pytest.raises(DataError, match=match):
        load_users_file(f)


def test_load_users_file_missing_or_not_python(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_users_file(tmp_path / "nope.py")
    (tmp_path / "u.txt").write_text("USERS = {}")
    with pytest.raises(DataError, match="Python file"):
        load_users_file(tmp_path / "u.txt")


def test_reward_failure_is_a_data_error():
    u = SimUser("bad", "custom", lambda p, c: 1 / 0)
    with pytest.raises(DataError, match="reward function failed"):
        u.reward("p", "c")


def test_get_training_users_refuses_held_out_users():
    from metarlhf.simusers import get_training_users

    names = list(TRAIN_USERS[:2])
    assert [u.name for u in get_training_users(",".join(names) + ",")] == names
    assert [u.name for u in get_training_users(names)] == names
    with pytest.raises(ConfigError, match="held out"):
        get_training_users([names[0], HELDOUT_USERS[0]])
    with pytest.raises(ConfigError):
        get_training_users("no-such-user")
    with pytest.raises(ConfigError):
        get_training_users(" , ")
