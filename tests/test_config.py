import logging

import pytest
import yaml

from coft_fast.config import REMOVED_KEYS, Config, ConfigError, set_value


def test_defaults_follow_the_docs():
    cfg = Config()
    assert cfg.model.name == "ViT-B-16" and cfg.model.pretrained == "openai"
    # the paper's method (issue 19): auto templates (the hand template for CoFT), plain cross-entropy,
    # one learning rate, DeFT's batch and transform
    assert cfg.zeroshot.templates == "auto"
    assert cfg.phase2.logit_adjust == 0.0 and cfg.phase1.vpt_lr_scale == 1.0 and cfg.phase1.batch_size == 64
    assert cfg.phase1.augment == "deft" and cfg.phase2.augment == "deft"
    assert cfg.testbed.context_length >= 32
    assert cfg.validate() is cfg
    # CoFT+ (method doc): R = 3 rounds; MoCo's momentum and queue; gamma 1; no projection head
    assert cfg.phase1.rounds == 3 and cfg.contrastive.momentum == 0.999 and cfg.contrastive.queue_size == 65536
    assert cfg.contrastive.gamma == 1.0 and cfg.contrastive.projection_dim == 0
    assert cfg.contrastive.queue_pool_fraction == 0.25 and 0.07 <= cfg.contrastive.temperature <= 0.2
    assert Config().override(["method=coft+"]).validate().method == "coft+"


def test_yaml_round_trip(tmp_path):
    cfg = Config().override(["seed=7", "data.batch_size=64", "model.pretrained=null", "testbed.lookalike_share=0.3"])
    cfg.save(tmp_path / "config.yaml")
    loaded = Config.load(tmp_path / "config.yaml")
    assert loaded == cfg
    assert loaded.seed == 7 and loaded.data.batch_size == 64 and loaded.model.pretrained is None


def test_partial_yaml_keeps_other_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  name: ViT-B-32\nseed: 3\n")
    cfg = Config.load(tmp_path / "c.yaml")
    assert cfg.model.name == "ViT-B-32" and cfg.seed == 3 and cfg.model.pretrained == "openai"


def test_overrides_parse_types():
    cfg = Config().override(["testbed.image_lr=0.001", "run.progress=false", "testbed.per_class=5", "model.name=RN50"])
    assert cfg.testbed.image_lr == 0.001 and cfg.run.progress is False
    assert cfg.testbed.per_class == 5 and cfg.model.name == "RN50"
    # an int is accepted where a float is expected, and numbers where a string is
    assert Config().override(["testbed.image_lr=1"]).testbed.image_lr == 1.0
    assert Config().override(["model.pretrained=123"]).model.pretrained == "123"
    # YAML 1.1 reads 2e-3 (no dot) as a string; a float field still takes it
    assert Config().override(["phase2.lr=2e-3"]).phase2.lr == 0.002


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.bach_size=3", "data.bach_size"),
        ("nosuchkey=1", "nosuchkey"),
        ("data.batch_size=many", "data.batch_size"),
        ("run.progress=maybe", "run.progress"),
        ("seed=1.5", "seed"),
        ("data=3", "data"),
        ("batchsize", "key=value"),
        ("seed.inner=1", "seed"),
        ("phase2.lr=nan", "phase2.lr"),
        ("phase2.lr=fast", "phase2.lr"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Config().override([override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError) as info:
        Config.load(path)
    assert "data.batch_sise" in str(info.value) and "bad.yaml" in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        Config.load(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(tmp_path / "broken.yaml")


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.precision=fp8", "model.precision"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.num_workers=-1", "data.num_workers"),
        ("testbed.lookalike_share=1.5", "testbed.lookalike_share"),
        ("data.split=training", "data.split"),
        ("phase1.vpt_lr_scale=-1", "phase1.vpt_lr_scale"),
        ("phase1.rounds=0", "phase1.rounds"),
        ("contrastive.momentum=1.0", "contrastive.momentum"),
        ("contrastive.temperature=0", "contrastive.temperature"),
        ("contrastive.gamma=-0.5", "contrastive.gamma"),
        ("contrastive.queue_size=0", "contrastive.queue_size"),
        ("contrastive.queue_pool_fraction=0", "contrastive.queue_pool_fraction"),
        ("contrastive.projection_dim=-1", "contrastive.projection_dim"),
        ("phase2.logit_adjust=-1", "phase2.logit_adjust"),
    ],
)
def test_validate_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config().override([override]).validate()


# Issue 37: keys that lost in every measurement. A saved run config still carries them at their old
# defaults, which load silently; any other value, and any --set of them, is an error naming the key.
OLD_RUN_CONFIG = {"phase1": {"train_on": "s_star", "selection_warmup_epochs": 1, "complement_hard_weight": 0.0},
                  "phase2": {"sample_weight": "none", "relabel_issues": False, "knn_monitor": False, "knn_k": 20}}
REMOVED_NOW = {"phase1.train_on": "pool_halves", "phase1.selection_warmup_epochs": 2,
               "phase1.complement_hard_weight": 0.5, "phase2.sample_weight": "clean_probability",
               "phase2.relabel_issues": True, "phase2.knn_monitor": True, "phase2.knn_k": 10}


def test_set_of_a_removed_key_names_it_and_says_removed():
    with pytest.raises(ConfigError, match=r"'phase1\.train_on' was removed"):
        Config().override(["phase1.train_on=pool_halves"])
    with pytest.raises(ConfigError, match=r"'phase1\.train_on' was removed"):
        set_value(Config(), "phase1.train_on", "pool_halves")
    assert set(REMOVED_NOW) <= set(REMOVED_KEYS)
    for key, value in REMOVED_NOW.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "' was removed"):
            Config().override([f"{key}={yaml.safe_dump(value).splitlines()[0]}"])
    for key in REMOVED_KEYS:  # an explicit --set is refused even at the old off value
        with pytest.raises(ConfigError, match="was removed"):
            set_value(Config(), key, REMOVED_KEYS[key][0][0])


@pytest.mark.parametrize("train_on", ["s_star", "auto"])
def test_a_saved_run_config_with_the_removed_keys_off_loads_silently(tmp_path, caplog, train_on):
    saved = Config().to_dict()
    for section, fields in OLD_RUN_CONFIG.items():
        saved[section].update(fields)
    saved["phase1"]["train_on"] = train_on
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    with caplog.at_level(logging.DEBUG):
        loaded = Config.load(path)
    assert loaded == Config() and loaded.validate() is loaded and not caplog.records
    assert not hasattr(loaded.phase1, "train_on") and not hasattr(loaded.phase2, "knn_monitor")
    assert loaded.pseudo.knn_k == Config().pseudo.knn_k  # pseudo.knn_k (the label refinement's) stays


@pytest.mark.parametrize("key, value", list(REMOVED_NOW.items()))
def test_a_saved_run_config_with_a_removed_key_on_names_the_key_and_file(tmp_path, key, value):
    section, name = key.split(".")
    data = {section: dict(OLD_RUN_CONFIG[section], **{name: value})}
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"run_config\.yaml.*" + key.replace(".", r"\.") + "' was removed") as info:
        Config.load(path)
    assert REMOVED_KEYS[key][1] in str(info.value)  # what replaces it


def test_knn_monitor_true_in_a_saved_run_config_is_an_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({section: dict(fields) for section, fields in OLD_RUN_CONFIG.items()}
                                   | {"phase2": dict(OLD_RUN_CONFIG["phase2"], knn_monitor=True)}))
    with pytest.raises(ConfigError, match=r"'phase2\.knn_monitor' was removed"):
        Config.load(path)


def test_removed_keys_hold_several_off_values_and_keep_the_older_entries():
    assert REMOVED_KEYS["phase1.train_on"][0] == ("s_star", "auto")
    assert Config.from_dict({"pseudo": {"knn_refine": False}}) == Config()
    with pytest.raises(ConfigError, match=r"'pseudo\.knn_refine' was removed: use pseudo\.refine=knn"):
        Config.from_dict({"pseudo": {"knn_refine": True}})
    # true and false never stand for 1 and 0: only the off value itself is ignored
    with pytest.raises(ConfigError, match="phase1.selection_warmup_epochs"):
        Config.from_dict({"phase1": {"selection_warmup_epochs": True}})
    with pytest.raises(ConfigError, match="phase2.relabel_issues"):
        Config.from_dict({"phase2": {"relabel_issues": 0}})
    assert Config.from_dict({"phase1": {"complement_hard_weight": 0}}) == Config()  # 0 is 0.0


def test_filter_rule_agreement_was_removed_and_the_error_lists_the_rules():
    with pytest.raises(ConfigError, match=r"'filter\.rule' must be one of auto, paper, mixture, got 'agreement'"):
        Config().override(["filter.rule=agreement"]).validate()
    with pytest.raises(ConfigError, match=r"filter\.rule"):
        Config().override(["pseudo.source=given", "filter.rule=agreement"]).validate()
    for rule in ("auto", "paper", "mixture"):
        assert Config().override([f"filter.rule={rule}"]).validate().filter.rule == rule


@pytest.mark.parametrize(
    "override, key",
    [
        ("method=coft++", "method"),
        ("phase2.train_on=s3", "phase2.train_on"),
        ("phase2.head_init=ones", "phase2.head_init"),
        ("phase1.seeds=[1, 1]", "phase1.seeds"),
        ("filter.threshold=1.0", "filter.threshold"),
        ("phase1.crop_scale_min=0", "phase1.crop_scale_min"),
        ("phase2.crop_scale_min=1.5", "phase2.crop_scale_min"),
        ("phase2.gce_q=0", "phase2.gce_q"),
        ("filter.probe_folds=1", "filter.probe_folds"),
        ("filter.probe_rounds=0", "filter.probe_rounds"),
        ("pseudo.knn_k=0", "pseudo.knn_k"),
        ("data.resident_max_gb=-1", "data.resident_max_gb"),
        ("data.eval_split=training", "data.eval_split"),
        ("testbed.teacher_width=-1", "testbed.teacher_width"),
        ("testbed.teacher_epochs=0", "testbed.teacher_epochs"),
        ("testbed.distill_weight=1.5", "testbed.distill_weight"),
        ("testbed.longtail_ratio=0.5", "testbed.longtail_ratio"),
        ("run.op_backend=cuda", "run.op_backend"),
        ("filter.detector=probe", "filter.detector"),  # zero-shot labels: no given labels to probe
        ("phase2.head_init=probe", "phase2.head_init"),  # with phase2.model below
    ],
)
def test_more_validation_names_the_key(override, key):
    cfg = Config().override([override] + (["phase2.model=ViT-B-32"] if override == "phase2.head_init=probe" else []))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_interval_and_minimum_messages_read_as_before():
    with pytest.raises(ConfigError, match=r"'filter\.threshold' must be in \(0, 1\), got 1\.0"):
        Config().override(["filter.threshold=1.0"]).validate()
    with pytest.raises(ConfigError, match=r"'contrastive\.momentum' must be in \[0, 1\), got 1\.0"):
        Config().override(["contrastive.momentum=1.0"]).validate()
    with pytest.raises(ConfigError, match=r"'data\.batch_size' must be at least 1, got 0"):
        Config().override(["data.batch_size=0"]).validate()
    assert Config().override(["data.split=val", "testbed.distill_weight=1", "contrastive.momentum=0"]).validate()
    cfg = Config()
    cfg.data.split = None  # the split of a CoOp JSON may be left unset
    assert cfg.validate() is cfg
