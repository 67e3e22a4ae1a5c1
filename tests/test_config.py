"""Recipe parsing, overrides and the one-line error messages."""

from __future__ import annotations

import pytest

from covr_lightning.build import instantiate
from covr_lightning.cli import main
from covr_lightning.config import config_to_dict, dump_config, find_recipe, load_recipe
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
        (["policy.actor_lr=fast"], r"'policy.actor_lr' expects a number > 0 .*'fast'"),
        (["run.total_env_steps=many"], r"'run.total_env_steps' expects an integer > 0"),
        (["run.total_env_steps=0"], r"'run.total_env_steps' is 0, but it must be an integer > 0"),
        (["covr.prior_weight=-1"], r"'covr.prior_weight' is -1, but it must be a number >= 0"),
        (["covr.vlm_image_size=20"], r"'covr.vlm_image_size' is 20.*integer >= 28"),
        (["env.image_size=0"], r"'env.image_size' is 0, but it must be an integer > 0"),
        (["run.accelerator=tpu"], r"'run.accelerator' expects"),
        (
            ["policy.actor_log_std_min=.nan"],
            r"'policy.actor_log_std_min' is nan, not a finite number",
        ),
        (["policy.actor_lr=nan"], r"'policy.actor_lr' is nan, but it must be a number > 0"),
        (["covr.prior_weight=inf"], r"'covr.prior_weight' is inf, not a finite number"),
        (["policy.actor_lr=[1, 2]"], r"'policy.actor_lr'"),
        (["policy.actor_lrr=1"], r"unknown recipe key 'policy.actor_lrr'.*'policy.actor_lr'"),
        (["run.seedd=2"], r"unknown recipe key 'run.seedd'.*did you mean 'run.seed'"),
        (["polcy.actor_lr=1"], r"unknown recipe section 'polcy'.*did you mean 'policy'"),
        (["policy.class_path=nopkg.Policy"], r"cannot use class_path 'nopkg.Policy'"),
        (["env.class_path=collections.OrderedDict"], r"not a subclass of PixelEnv"),
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


QUICKSTART_HEAD = "base: quickstart\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a text file"),
        (b"", "is empty"),
        (b"# only a comment\n", "is empty"),
        (b"- run\n- env\n", "is a YAML list, not a mapping"),
        (b"42\n", "is a YAML int, not a mapping"),
        (b"run:\n  seed: 1\nrun:\n  seed: 2\n", "duplicate key 'run'"),
        (b"run:\n  seed: 1\n  seed: 2\n", "duplicate key 'seed'"),
        (b"policy: 3\n", "section 'policy' .* is a int, not a mapping"),
        (b"run:\n  1: 2\n", "recipe key run.1 .* is not text"),
        (b"run:\n  seed: [1\n", "not valid YAML"),
        (b"base: nope_not_a_recipe\n", "base recipe 'nope_not_a_recipe' .* not found"),
        (b"base: 3\n", "is not a recipe name"),
        (b"envv: {}\n", "unknown recipe section 'envv'"),
        (QUICKSTART_HEAD.encode() + b"run:\n  seed: one\n", "'run.seed' expects"),
    ],
)
def test_a_file_that_is_not_a_recipe_is_one_line_through_the_cli(
    content, expected, tmp_path, capsys
):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        load_recipe(str(path))
    assert main(["fit", "--recipe", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covr-lightning: error: ") and err.count("\n") == 1, err
    assert "Fix:" in err and "Traceback" not in err


def test_a_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(ConfigError, match="no recipe"):
        load_recipe(str(tmp_path))


def test_circular_bases_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle \(a.yaml -> b.yaml -> a.yaml\)"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_a_delta_changes_only_what_it_states(tmp_path):
    path = tmp_path / "delta.yaml"
    path.write_text(QUICKSTART_HEAD + "sft:\n  init_args:\n    ralw_mode: none\nrun:\n  seed: 9\n")
    base, delta = config_to_dict(load_recipe("quickstart")), config_to_dict(load_recipe(str(path)))
    assert delta["sft"]["init_args"]["ralw_mode"] == "none" and delta["run"]["seed"] == 9
    delta["sft"]["init_args"]["ralw_mode"] = base["sft"]["init_args"]["ralw_mode"]
    delta["run"]["seed"] = base["run"]["seed"]
    assert delta == base


def test_another_class_path_replaces_the_component_whole(tmp_path):
    path = tmp_path / "rad.yaml"
    path.write_text(
        QUICKSTART_HEAD + "policy:\n  class_path: covr_lightning.policies.rad.RADModule\n"
    )
    policy = config_to_dict(load_recipe(str(path)))["policy"]
    assert policy["class_path"].endswith("RADModule")
    # RAD's own defaults, not the quickstart's SAC settings (e.g. its 2-layer encoder).
    quick = config_to_dict(load_recipe("quickstart"))["policy"]["init_args"]
    assert policy["init_args"]["num_conv_layers"] != quick["num_conv_layers"]


def test_resolved_numbers_are_plain_python_numbers():
    """Typed values (PositiveFloat...) would reach optimizer states and so checkpoints, which
    torch's weights_only loader refuses; the resolved config holds plain ints and floats."""
    cfg = load_recipe("dmc_cheetah_sac", ["policy.actor_lr=3e-4", "replay.capacity=1000"])
    for key, value in cfg.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert type(value) in (int, float), (key, type(value))
