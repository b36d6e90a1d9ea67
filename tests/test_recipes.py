"""Named recipes (coft_fast/recipes/*.yaml), their precedence, and the values resolved before a run."""
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import coft_fast
from coft_fast.api import resolve_config
from coft_fast.cli import run as cli_run
from coft_fast.config import (RECIPES_DIR, REMOVED_KEYS, Config, ConfigError, list_recipes, load_recipe, recipe_names,
                               resolve_auto)

REPO = Path(__file__).resolve().parent.parent
NAMES = ["paper-coft", "paper-coftplus", "paper-distill", "testbed", "transductive"]
SOURCES = ("paper", "DeFT", "MoCo", "CoOp", "method doc", "measured")


def test_the_recipes_ship_and_each_loads_validates_and_round_trips_through_yaml(tmp_path):
    assert recipe_names() == NAMES
    for recipe in list_recipes():
        assert recipe.version >= 1 and recipe.summary and recipe.path.parent == RECIPES_DIR
        cfg = resolve_auto(recipe.config())
        cfg.save(tmp_path / f"{recipe.name}.yaml")
        assert Config.load(tmp_path / f"{recipe.name}.yaml") == cfg



def _dotted_keys(settings, prefix=""):
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_the_recipes_folder_is_the_packages_and_no_recipe_sets_a_removed_key():
    assert RECIPES_DIR == Path(coft_fast.__file__).resolve().parent / "recipes"  # not inside coft_fast/config/
    for recipe in list_recipes():
        assert not set(_dotted_keys(recipe.settings)) & set(REMOVED_KEYS), recipe.name


@pytest.mark.parametrize("overrides, detector, rule", [
    ([], "prompts", "paper"),  # CoFT on zero-shot labels: the paper's filter
    (["pseudo.source=given"], "probe", "mixture"),  # clean-labels with coft: the probe detector
    (["pseudo.source=given", "method=coft+"], "prompts", "paper"),
    (["pseudo.source=given", "method=self-train"], "prompts", "paper"),
    (["pseudo.source=given", "filter.detector=prompts"], "prompts", "paper"),
    (["pseudo.source=given", "filter.rule=paper"], "probe", "paper"),
])
def test_the_filter_detector_and_rule_resolve_from_the_label_source_and_method(overrides, detector, rule):
    cfg = resolve_auto(Config().override(overrides).validate())
    assert (cfg.filter.detector, cfg.filter.rule) == (detector, rule)

def test_paper_coft_is_the_default_config():
    assert load_recipe("paper-coft").config() == Config()
    assert resolve_config(recipe="paper-coft") == resolve_config()


def test_testbed_reproduces_the_defaults_before_issue_19_exactly():
    """Every test-bed figure before issue 19 was measured with these values; the rest is the defaults."""
    cfg = load_recipe("testbed").config()
    old = {("zeroshot", "templates"): "ensemble", ("phase2", "logit_adjust"): 1.0, ("phase1", "vpt_lr_scale"): 0.1,
           ("phase1", "batch_size"): 32, ("phase1", "augment"): "random_resized_crop",
           ("phase2", "augment"): "random_resized_crop", ("phase1", "crop_scale_min"): 0.5,
           ("phase2", "crop_scale_min"): 0.5}
    defaults, got = Config().to_dict(), cfg.to_dict()
    for (section, key), value in old.items():
        assert got[section][key] == value, (section, key)
    for section, fields in got.items():
        if isinstance(fields, dict):
            for key, value in fields.items():
                if (section, key) not in old:
                    assert value == defaults[section][key], (section, key)


def test_paper_recipes_set_what_the_paper_says():
    plus = resolve_auto(load_recipe("paper-coftplus").config())
    assert plus.method == "coft+" and plus.phase1.rounds == 3 and plus.zeroshot.templates == "ensemble"
    distill = load_recipe("paper-distill").config()
    assert (distill.model.name, distill.model.pretrained) == ("ViT-L-14", "openai")
    assert (distill.phase2.model, distill.phase2.pretrained) == ("ViT-B-16", "openai")


@pytest.mark.parametrize("name", NAMES)
def test_every_field_of_a_recipe_says_where_its_value_comes_from(name):
    lines = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("config:")) + 1:]
    leaves = [line for line in body if re.match(r"^\s+[a-z_0-9]+:\s*[^#\s]", line)]
    assert leaves
    for line in leaves:
        comment = line.partition("#")[2]
        assert any(source in comment for source in SOURCES), f"{name}: no source for {line.strip()!r}"


def test_precedence_defaults_then_recipe_then_config_file_then_set(tmp_path):
    (tmp_path / "c.yaml").write_text("phase1:\n  vpt_lr_scale: 0.5\n  batch_size: 16\n")
    cfg = resolve_config(tmp_path / "c.yaml", ["phase1.batch_size=8"], recipe="testbed")
    assert cfg.phase2.logit_adjust == 1.0  # from the recipe
    assert cfg.phase1.vpt_lr_scale == 0.5  # the file wins over the recipe
    assert cfg.phase1.batch_size == 8  # --set wins over the file
    assert cfg.phase2.epochs == Config().phase2.epochs  # the rest: defaults


def test_a_recipe_with_a_config_object_is_refused_and_bad_recipes_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        resolve_config(Config(), recipe="testbed")
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*paper-coft"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: bad\nversion: 1\nsummary: x\nconfig:\n  phase2:\n    logit_adjst: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*phase2\.logit_adjst"):
        load_recipe(bad)
    bad.write_text("recipe: bad\nversion: 1\nconfig: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: missing keys summary"):
        load_recipe(bad)
    bad.write_text("recipe: bad\nversion: 1\nsummary: x\nconfig:\n  phase1:\n    augment: crop\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*phase1\.augment"):
        load_recipe(bad)


def test_templates_auto_resolves_per_method_and_command(caplog, tmp_path):
    assert resolve_config().zeroshot.templates == "single"
    assert resolve_config(overrides=["method=self-train"]).zeroshot.templates == "single"
    assert resolve_config(command="zeroshot").zeroshot.templates == "ensemble"
    with caplog.at_level(logging.WARNING, logger="coft_fast"):
        assert resolve_config(overrides=["method=coft+"]).zeroshot.templates == "ensemble"
    assert sum("80-template ensemble" in r.getMessage() for r in caplog.records) == 1
    given = tmp_path / "t.json"
    assert resolve_config(overrides=[f"method=coft+", f"zeroshot.templates={given}"]).zeroshot.templates == str(given)


def test_distillation_inherits_the_pretrained_tag_or_stops_naming_phase2_pretrained():
    """Defect: phase2.model without phase2.pretrained built phase II with random weights."""
    cfg = resolve_config(overrides=["model.name=ViT-L-14", "phase2.model=ViT-B-16"])
    assert cfg.phase2.pretrained == "openai"
    with pytest.raises(ConfigError, match="phase2.pretrained"):
        resolve_config(overrides=["model.name=ViT-L-14", "model.pretrained=laion2b_s32b_b82k", "phase2.model=ViT-B-16"])
    kept = resolve_config(overrides=["phase2.model=ViT-B-16", "phase2.pretrained=laion400m_e31"])
    assert kept.phase2.pretrained == "laion400m_e31"


def test_a_run_refuses_an_unresolved_distillation_backbone(tiny_testbed, digits):
    """A run built from a config that skipped resolve_auto never fine-tunes a random backbone."""
    import torch

    from coft_fast.data import from_folder
    from coft_fast.models import load_clip
    from coft_fast.stages.context import RunContext
    from coft_fast.stages.finetune import phase2_backbone

    cfg = Config().override(["phase2.model=ViT-B-16", "zeroshot.templates=single"])
    clip = load_clip(f"local-dir:{tiny_testbed}", device="cpu")
    run = RunContext(cfg, from_folder(digits["pool"]), None, clip, torch.device("cpu"), None)
    with pytest.raises(ValueError, match="phase2.pretrained"):
        phase2_backbone(run)


def test_cli_lists_recipes_and_config_prints_one(capsys):
    assert cli_run(["recipes"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[:len(NAMES)]] == NAMES
    assert cli_run(["config", "--recipe", "testbed", "--set", "seed=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["phase2"]["logit_adjust"] == 1.0 and printed["zeroshot"]["templates"] == "ensemble"
    assert printed["seed"] == 4
    assert cli_run(["config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["zeroshot"]["templates"] == "single" and printed["phase2"]["logit_adjust"] == 0.0
    from coft_fast.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("train", "zeroshot", "demo", "testbed", "config"):
        assert "--recipe" in commands[command].format_help(), command


def test_recipes_are_package_data_and_found_from_outside_the_checkout(tmp_path):
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "recipes/*.yaml" in package_data["coft_fast"]
    out = subprocess.run([sys.executable, "-c", "from coft_fast.config import recipe_names; print(*recipe_names())"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == NAMES, out.stderr


def test_prompts_read_underscores_as_spaces_and_metrics_record_the_templates(tmp_path):
    import hashlib

    from coft_fast.pseudo import class_name_mapping, class_prompts, templates_record

    assert class_prompts("single", ["sea_lion", "cat"]) == [["a photo of a sea lion."], ["a photo of a cat."]]
    assert class_name_mapping(["sea_lion"]) == {"sea_lion": "sea lion"}
    file = tmp_path / "t.json"
    file.write_text('{"sea_lion": ["a {} on a rock."], "cat": ["a {}."]}')
    assert class_prompts(str(file), ["sea_lion", "cat"]) == [["a sea lion on a rock."], ["a cat."]]
    assert templates_record("single") == "single" and templates_record("ensemble") == "ensemble"
    assert templates_record(str(file)) == {"file": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
