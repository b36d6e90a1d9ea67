import pytest

from coft_fast.config import Config, ConfigError


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
