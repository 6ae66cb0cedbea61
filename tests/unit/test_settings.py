"""Settings: YAML < environment < --set, typed, and bad values are clear errors."""
from pathlib import Path

import pytest

from adtr_edge.agent.settings import SettingsError, load_settings, merge, parse_overrides
from adtr_edge.model.config import AdtrConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_edge_yaml_is_exactly_the_defaults():
    assert load_settings(CONFIGS / "edge.yaml") == AdtrConfig()


def test_edge_yaml_lists_every_setting():
    """The file users copy to change a setting names all of them (a new setting must be added there)."""
    import yaml

    listed = yaml.safe_load((CONFIGS / "edge.yaml").read_text())
    defaults = AdtrConfig().model_dump()
    assert set(listed) == set(defaults)
    for section, values in defaults.items():
        assert set(listed[section]) == set(values), section


def test_paper_b4_config_is_the_paper_setup():
    cfg = load_settings(CONFIGS / "paper-b4.yaml")
    assert cfg.backbone.name == "efficientnet_b4" and cfg.backbone.levels == [1, 2, 3, 4, 5]
    r = cfg.reconstructor
    assert (r.hidden_dim, r.num_encoder_layers, r.num_decoder_layers, r.num_heads, r.ffn_dim) == (256, 4, 4, 8, 1024)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.lr_drop_at) == (500, 1e-4, 0.8)
    assert cfg.scoring.image_terms == cfg.scoring.localization_terms == ["l2"]


def test_precedence_yaml_then_env_then_set(tmp_path, monkeypatch):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  epochs: 3\n  lr: 0.5\nbackbone:\n  image_size: 128\n")
    monkeypatch.setenv("ADTR_EDGE_TRAIN__EPOCHS", "7")
    cfg = load_settings(yaml_file, ["backbone.image_size=96"])
    assert cfg.train.epochs == 7  # env beats YAML
    assert cfg.train.lr == 0.5  # YAML beats default
    assert cfg.backbone.image_size == 96  # --set beats everything
    assert cfg.backbone.feature_size == 16  # untouched default


def test_set_values_are_parsed_as_yaml():
    assert parse_overrides(["backbone.levels=[1, 2]", "train.lr=0.5", "data.bad_files=fail"]) == {
        "backbone": {"levels": [1, 2]}, "train": {"lr": 0.5}, "data": {"bad_files": "fail"}}
    # YAML 1.1 reads 1e-3 as text; the typed setting still gets a float.
    assert load_settings(overrides=["train.lr=1e-3"]).train.lr == 1e-3


@pytest.mark.parametrize("override, message", [
    (["train.epochs=-1"], "train.epochs"),
    (["train.epochz=3"], "train.epochz"),
    (["backbone.levels=[7]"], "backbone.levels"),
    (["reconstructor.hidden_dim=100", "reconstructor.num_heads=3"], "divisible"),
    (["scoring.blur_sigma=-1"], "scoring.blur_sigma"),
    (["scoring.image_terms=[cosine]"], "scoring.image_terms"),
    (["scoring.localization_terms=[]"], "scoring.localization_terms"),
    (["scoring.fusion_quantiles=[0.9, 0.5]"], "scoring.fusion_quantiles"),
    (["noequals"], "key=value"),
])
def test_bad_values_name_the_setting(override, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(overrides=override)


def test_bad_environment_value_is_an_error(monkeypatch):
    monkeypatch.setenv("ADTR_EDGE_TRAIN__BATCH_SIZE", "lots")
    with pytest.raises(SettingsError, match="train.batch_size"):
        load_settings()


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(listy)


def test_merge_overrides_an_existing_config():
    cfg = merge(AdtrConfig(), ["data.limit_per_class=5"])
    assert cfg.data.limit_per_class == 5 and cfg.train == AdtrConfig().train
    with pytest.raises(SettingsError):
        merge(cfg, ["data.limit_per_class=-1"])


def test_agent_yaml_is_exactly_the_agent_defaults():
    from adtr_edge.agent.settings import AgentConfig, AgentSettings

    assert load_settings(CONFIGS / "agent.yaml", kind=AgentSettings) == AgentConfig()


def test_agent_settings_come_from_env_and_overrides_and_reject_unknown_keys(monkeypatch):
    from adtr_edge.agent.settings import AgentSettings

    monkeypatch.setenv("ADTR_EDGE_INGEST__MODE", "latest")
    cfg = load_settings(overrides=["inference.max_batch=4"], kind=AgentSettings)
    assert cfg.ingest.mode == "latest" and cfg.inference.max_batch == 4
    with pytest.raises(SettingsError, match="ingest.bogus"):
        load_settings(overrides=["ingest.bogus=1"], kind=AgentSettings)
    with pytest.raises(SettingsError, match="backbone"):
        load_settings(overrides=["backbone.image_size=128"], kind=AgentSettings)  # model settings live in the model


def test_curve_without_its_keys_is_a_settings_error_before_anything_starts():
    from adtr_edge.agent.settings import AgentSettings

    with pytest.raises(SettingsError, match="ingest.curve.server_secret_key"):
        load_settings(overrides=["ingest.curve.enabled=true"], kind=AgentSettings)


def test_camera_ids_bound_to_curve_keys_are_checked_before_anything_starts(tmp_path):
    """ingest.curve.cameras: only with CURVE, no empty id list, and every key it names must have its file."""
    import zmq.auth

    from adtr_edge.actors.ingest import key_bindings
    from adtr_edge.agent.settings import AgentSettings

    with pytest.raises(SettingsError, match="needs ingest.curve.enabled"):
        load_settings(overrides=['ingest.curve.cameras={"cam-1": ["cam-1"]}'], kind=AgentSettings)
    public, secret = zmq.auth.create_certificates(str(tmp_path), "cam-1")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "cam-1.key").write_bytes(Path(public).read_bytes())
    curve = ["ingest.curve.enabled=true", f"ingest.curve.server_secret_key={secret}",
             f"ingest.curve.allowed_keys_dir={allowed}"]
    with pytest.raises(SettingsError, match="list no camera id"):
        load_settings(overrides=[*curve, 'ingest.curve.cameras={"cam-1": []}'], kind=AgentSettings)
    assert key_bindings(load_settings(overrides=curve, kind=AgentSettings).ingest) is None  # not bound
    cfg = load_settings(overrides=[*curve, 'ingest.curve.cameras={"cam-1": ["cam-1", "cam-1b"]}'],
                        kind=AgentSettings)
    key = zmq.auth.load_certificate(public)[0].decode()
    assert key_bindings(cfg.ingest) == {key: ("cam-1", frozenset({"cam-1", "cam-1b"}))}
    cfg = load_settings(overrides=[*curve, 'ingest.curve.cameras={"cam-2": ["cam-2"]}'], kind=AgentSettings)
    with pytest.raises(ValueError, match="cam-2.key does not exist"):
        key_bindings(cfg.ingest)


def test_the_kuberay_agent_manifest_uses_real_agent_settings():
    """deploy/kuberay/agent.yaml passes --set overrides: each must be a setting the agent accepts."""
    import yaml

    from adtr_edge.agent.settings import AgentSettings

    deployment = next(doc for doc in yaml.safe_load_all((CONFIGS.parent / "deploy/kuberay/agent.yaml").read_text())
                      if doc["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_settings(overrides=overrides, kind=AgentSettings)
    assert cfg.learning.retrain.label_selector == {"adtr-role": "trainer"} and cfg.ray.address


def test_an_ingest_endpoint_other_hosts_reach_needs_a_peer_list_or_curve():
    from adtr_edge.actors.config import IngestConfig
    from adtr_edge.agent.errors import AgentError
    from adtr_edge.agent.runner import Agent

    open_cfg = IngestConfig()
    assert open_cfg.peer_allowlist("tcp://127.0.0.1:*") == ["127.0.0.1", "::1"]  # loopback: loopback only
    assert open_cfg.peer_allowlist("ipc:///tmp/cams") is None  # this host's file permissions decide
    for endpoint in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.10.5:5555"):
        with pytest.raises(ValueError, match="reachable from other hosts"):
            open_cfg.peer_allowlist(endpoint)
    assert IngestConfig(allowed_peers=["192.168.10.21"]).peer_allowlist("tcp://0.0.0.0:5555") == ["192.168.10.21"]
    assert IngestConfig(allowed_peers=["*"]).peer_allowlist("tcp://0.0.0.0:5555") is None
    with pytest.raises(ValueError, match="not an IP address"):
        IngestConfig(allowed_peers=["camera-7"])
    from adtr_edge.agent.settings import AgentSettings

    with pytest.raises(AgentError, match="reachable from other hosts"):  # refused before Ray starts
        Agent("/nonexistent", ["tcp://0.0.0.0:5555"], "tcp://127.0.0.1:*", load_settings(kind=AgentSettings))


def test_an_unknown_adtr_edge_variable_is_refused_by_name(monkeypatch):
    from adtr_edge.agent.settings import AgentSettings

    monkeypatch.setenv("ADTR_EDGE_TRAIN__EPOCHS", "3")  # a model setting: fine for both kinds
    monkeypatch.setenv("ADTR_EDGE_INGEST__MODE", "latest")  # an agent setting: fine for both kinds
    assert load_settings().train.epochs == 3
    assert load_settings(kind=AgentSettings).ingest.mode == "latest"
    monkeypatch.setenv("ADTR_EDGE_BOGUS", "1")
    for kind in ({}, {"kind": AgentSettings}):
        with pytest.raises(SettingsError, match="ADTR_EDGE_BOGUS"):
            load_settings(**kind)
    monkeypatch.delenv("ADTR_EDGE_BOGUS")
    monkeypatch.setenv("adtr_edge_ingst__mode", "latest")  # a misspelled section, in any case
    with pytest.raises(SettingsError, match="adtr_edge_ingst__mode"):
        load_settings(kind=AgentSettings)
