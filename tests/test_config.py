from pathlib import Path

import pytest

from laion_spark.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    for name in ("local.yaml", "emr.yaml", "dataproc.yaml"):
        cfg = load_config(REPO / "conf" / name)
        assert isinstance(cfg, Config)
    assert load_config(REPO / "conf" / "emr.yaml").lake.root.startswith("s3://")


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "download:\n  thread_per_task: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg
    assert "unknown key 'download.thread_per_task'" in msg
    assert "threads_per_task" in msg  # the known keys are listed


def test_unknown_section(tmp_path):
    p = write(tmp_path, "downlaod:\n  threads_per_task: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'downlaod'"):
        load_config(p)


def test_wrong_type_names_key_and_type(tmp_path):
    p = write(tmp_path, "download:\n  threads_per_task: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value) == (
        f"{p}: key 'download.threads_per_task' expects int, got str 'many'"
    )


def test_bool_is_not_an_int(tmp_path):
    p = write(tmp_path, "download:\n  image_size: true\n")
    with pytest.raises(ConfigError, match="'download.image_size' expects int, got bool"):
        load_config(p)


def test_int_widens_to_float_and_optional(tmp_path):
    p = write(tmp_path, "score:\n  threshold_en: 1\n  nsfw_head: null\n")
    cfg = load_config(p)
    assert cfg.score.threshold_en == 1.0 and isinstance(cfg.score.threshold_en, float)
    assert cfg.score.nsfw_head is None


def test_list_item_type(tmp_path):
    p = write(tmp_path, "extract:\n  inputs: [a.warc.gz, 3]\n")
    with pytest.raises(ConfigError, match=r"'extract.inputs\[1\]' expects str, got int 3"):
        load_config(p)


def test_overrides(tmp_path):
    p = write(tmp_path, "download:\n  threads_per_task: 3\n")
    cfg = load_config(p, ["download.threads_per_task=16", "lake.root=/tmp/x",
                          "extract.inputs=[a, b]", "score.device=cpu"])
    assert cfg.download.threads_per_task == 16
    assert cfg.lake.root == "/tmp/x"
    assert cfg.extract.inputs == ["a", "b"]
    assert cfg.score.device == "cpu"


def test_override_errors():
    with pytest.raises(ConfigError, match=r"--set download.nope=1: unknown key 'download.nope'"):
        load_config(None, ["download.nope=1"])
    with pytest.raises(ConfigError, match=r"'download.max_bytes' expects int, got str 'lots'"):
        load_config(None, ["download.max_bytes=lots"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["download.max_bytes"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_section_must_be_mapping(tmp_path):
    p = write(tmp_path, "download: 3\n")
    with pytest.raises(ConfigError, match="key 'download' is a section"):
        load_config(p)
