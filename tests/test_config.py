"""Recipe parsing, overrides and the one-line error messages."""

from __future__ import annotations

import pytest

from covr_lightning.config import dump_config, find_recipe, instantiate, load_recipe
from covr_lightning.errors import ConfigError


def test_packaged_recipe_resolves_by_name_and_by_filename():
    assert find_recipe("quickstart") == find_recipe("quickstart.yaml")
    assert find_recipe("quickstart").is_file()


def test_unknown_recipe_suggests_close_name():
    with pytest.raises(ConfigError, match=r"no recipe 'quikstart'.*did you mean 'quickstart.yaml'"):
        find_recipe("quikstart")


def test_overrides_apply_and_keep_other_values():
    cfg = load_recipe("quickstart", ["policy.actor_lr=3e-4", "run.seed=7"])
    assert cfg.policy.init_args.actor_lr == pytest.approx(3e-4)
    assert cfg.run.seed == 7
    assert cfg.env.init_args.domain == "cartpole"


def test_dump_is_reloadable(tmp_path):
    cfg = load_recipe("quickstart", ["run.seed=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_recipe(str(path)) == cfg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["policy.actor_lr=fast"], r"'policy.actor_lr' expects float, got 'fast'"),
        (["run.total_env_steps=many"], r"'run.total_env_steps' expects int"),
        (["policy.actor_lrr=1"], r"unknown recipe key 'policy.actor_lrr'.*'policy.actor_lr'"),
        (["run.seedd=2"], r"unknown recipe key 'run.seedd'.*did you mean 'run.seed'"),
        (["polcy.actor_lr=1"], r"unknown recipe section 'polcy'.*did you mean 'policy'"),
        (["policy.class_path=nopkg.Policy"], r"cannot use class_path 'nopkg.Policy'"),
        (["env.class_path=collections.OrderedDict"], r"not a subclass of Env"),
        (["run.seed"], r"not of the form dotted.key=value"),
    ],
)
def test_bad_input_is_one_line_with_a_fix(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_recipe("quickstart", overrides)
    line = info.value.line()
    assert "\n" not in line
    assert "Fix:" in line


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(path))


def test_user_subclass_from_outside_the_package(tmp_path, monkeypatch):
    (tmp_path / "my_policies.py").write_text(
        "from covr_lightning.policies.sac import SACPolicyModule\n"
        "class WiderSAC(SACPolicyModule):\n"
        "    def __init__(self, obs_shape, action_dim, *, width_note: str = 'wide', **kwargs):\n"
        "        super().__init__(obs_shape, action_dim, **kwargs)\n"
        "        self.width_note = width_note\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_recipe(
        "quickstart", ["policy.class_path=my_policies.WiderSAC", "policy.width_note=custom"]
    )
    policy = instantiate(cfg.policy, obs_shape=(9, 64, 64), action_dim=1)
    assert type(policy).__name__ == "WiderSAC"
    assert policy.width_note == "custom"
