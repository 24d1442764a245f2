"""The deploy files say what they do: every script passes shellcheck, the EMR/Dataproc JSON and
commands name only files that exist in the repo (uploaded in its layout) or that the bootstrap /
init action writes, the configs they ship load, and the cluster-side settings agree with each
other (Python path, GPU discovery script, cgroup mount, cluster deploy mode with --files)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from laion_spark.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
EMR = DEPLOY / "emr"
DATAPROC = DEPLOY / "dataproc"
S3_PREFIX = "s3://YOUR-BUCKET/laion-spark"
GS_PREFIX = "gs://YOUR-BUCKET/laion-spark"
DISCOVERY = "/opt/laion-spark/bin/getGpusResources.sh"
STAGE_JOBS = {"extract": "extract.py", "download": "download.py", "score": "score.py",
              "index": "build_index.py"}


def _version() -> str:
    return re.search(r"^version\s*=\s*(\S+)", (REPO / "setup.cfg").read_text(), re.M).group(1)


def _wheel_name() -> str:
    return f"laion_spark-{_version()}-py3-none-any.whl"


def _repo_path(uri: str, prefix: str) -> Path:
    """The repo file an uploaded object is a copy of (upload.sh mirrors the repo's layout)."""
    assert uri.startswith(prefix + "/"), f"{uri} is not under {prefix}"
    return REPO / uri[len(prefix) + 1:]


def _check_uploaded(uri: str, prefix: str) -> None:
    rel = uri[len(prefix) + 1:]
    if rel.startswith("dist/"):
        assert rel == f"dist/{_wheel_name()}", f"{uri}: the wheel of version {_version()} is {_wheel_name()}"
    else:
        assert _repo_path(uri, prefix).is_file(), f"{uri} names {rel}, not a file of the repo"


def _heredoc(script: Path, tag: str = "SCRIPT") -> str:
    text = script.read_text()
    m = re.search(rf"<<'{tag}'\n(.*?)\n{tag}\n", text, re.S)
    assert m, f"{script}: no <<'{tag}' here-document"
    return m.group(1) + "\n"


def _scripts() -> list[Path]:
    return sorted(DEPLOY.rglob("*.sh")) + [REPO / "scripts" / "setup-system.sh"]


def test_shellcheck_passes_on_every_deploy_script(tmp_path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is missing: scripts/setup-system.sh installs it (Debian package shellcheck)")
    scripts = _scripts()
    assert len(scripts) >= 10
    # the GPU discovery script the bootstrap / init action write on each node, checked as a file
    discovery = tmp_path / "getGpusResources.sh"
    discovery.write_text(_heredoc(EMR / "bootstrap.sh"))
    proc = subprocess.run([shellcheck, "-x", *map(str, scripts), str(discovery)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_discovery_script_prints_spark_resource_json(tmp_path):
    """Same script on EMR and Dataproc; with a stand-in nvidia-smi it prints Spark's format."""
    emr, dataproc = _heredoc(EMR / "bootstrap.sh"), _heredoc(DATAPROC / "init-action.sh")
    assert emr == dataproc
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    fake.chmod(0o755)
    script = tmp_path / "discover.sh"
    script.write_text(emr)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"name": "gpu", "addresses": ["0", "1"]}
    fake.write_text("#!/bin/sh\nexit 9\n")  # no driver: the script fails, Spark reports it
    assert subprocess.run(["bash", str(script)], env=env, capture_output=True).returncode != 0


@pytest.mark.parametrize("script", [EMR / "bootstrap.sh", DATAPROC / "init-action.sh"])
def test_installers_hide_no_failure_and_need_no_environment(script, tmp_path):
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert "|| true" not in text, "a failed install must fail the node"
    # pyspark is never installed next to the cluster's own Spark
    assert re.search(r"pip show -q pyspark", text)
    # started with an empty environment and no arguments it stops with its own message, not at
    # an unbound variable
    proc = subprocess.run(["/bin/bash", str(script)], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert proc.returncode != 0
    assert "unbound variable" not in proc.stderr
    assert "wheel" in proc.stderr, proc.stderr


def _emr_json(name: str):
    return json.loads((EMR / name).read_text())


def _classification(configs: list, name: str) -> dict:
    found = [c for c in configs if c["Classification"] == name]
    assert len(found) == 1, f"{name}: {len(found)} classifications"
    return found[0]


def test_emr_steps_run_in_cluster_mode_with_shipped_config():
    steps = _emr_json("steps.json")
    assert [s["Name"] for s in steps] == list(STAGE_JOBS)
    for step in steps:
        args = step["Args"]
        assert step["Type"] == "Spark"
        assert args[args.index("--deploy-mode") + 1] == "cluster", step["Name"]
        shipped = args[args.index("--files") + 1].split(",")
        job = next(a for a in args if a.endswith(".py"))
        assert job == f"{S3_PREFIX}/jobs/{STAGE_JOBS[step['Name']]}"
        job_args = args[args.index(job) + 1:]
        config = job_args[job_args.index("--config") + 1]
        # cluster mode: --files land in the driver's working folder, so the basename is found
        assert config in [u.rsplit("/", 1)[1] for u in shipped], step["Name"]
        for uri in [job, *shipped]:
            _check_uploaded(uri, S3_PREFIX)
        for uri in shipped:
            if uri.endswith(".yaml"):
                load_config(_repo_path(uri, S3_PREFIX))
        confs = dict(a.split("=", 1) for a in args[1::] if "=" in a and a.startswith("spark."))
        if step["Name"] == "score":
            assert confs["spark.executor.resource.gpu.amount"] == "1"
            assert confs["spark.task.resource.gpu.amount"] == "1"
            # an address-space limit breaks CUDA: the score step must not set one
            assert "spark.executor.pyspark.memory" not in confs
        else:
            assert not any("gpu" in k for k in confs), step["Name"]


def test_emr_configurations_agree_with_the_bootstrap():
    configs = _emr_json("configurations.json")
    defaults = _classification(configs, "spark-defaults")["Properties"]
    bootstrap = (EMR / "bootstrap.sh").read_text()
    python = re.search(r"\bpython=(\S+)", bootstrap).group(1)
    assert defaults["spark.pyspark.python"] == f"/usr/bin/{python}"
    assert defaults["spark.pyspark.driver.python"] == f"/usr/bin/{python}"
    env = _classification(_classification(configs, "spark-env")["Configurations"], "export")
    assert env["Properties"]["PYSPARK_PYTHON"] == f"/usr/bin/{python}"
    assert defaults["spark.executor.resource.gpu.discoveryScript"] == DISCOVERY
    assert DISCOVERY in bootstrap  # the bootstrap writes it on every node
    assert "spark.driver.maxResultSize" in defaults
    assert "spark.executor.memoryOverhead" in defaults
    assert "gpu.amount" not in json.dumps(defaults)  # CPU stages ask for no GPU
    assert _classification(configs, "capacity-scheduler")["Properties"][
        "yarn.scheduler.capacity.resource-calculator"].endswith("DominantResourceCalculator")
    assert "yarn.io/gpu" in _classification(configs, "yarn-site")["Properties"]["yarn.resource-types"]
    assert _classification(configs, "delta-defaults")["Properties"]["delta.enabled"] == "true"


def test_emr_gpu_instance_group_runs_the_yarn_gpu_plugin():
    groups = _emr_json("instance-groups.json")
    assert {g["InstanceGroupType"] for g in groups} == {"MASTER", "CORE", "TASK"}
    with_gpu = [g for g in groups if g.get("Configurations")]
    assert len(with_gpu) == 1 and with_gpu[0]["InstanceType"].startswith(("g", "p"))
    site = _classification(with_gpu[0]["Configurations"], "yarn-site")["Properties"]
    assert site["yarn.nodemanager.resource-plugins"] == "yarn.io/gpu"
    mount = site["yarn.nodemanager.linux-container-executor.cgroups.mount-path"]
    # the bootstrap mounts the devices hierarchy where the NodeManager looks for it
    assert f"{mount}/devices" in (EMR / "bootstrap.sh").read_text()
    ce = _classification(with_gpu[0]["Configurations"], "container-executor")["Configurations"]
    assert _classification(ce, "gpu")["Properties"]["module.enabled"] == "true"
    assert _classification(ce, "cgroups")["Properties"]["root"] == mount
    # CPU groups carry no GPU plugin (a NodeManager with it and no GPU does not start)
    assert all(not g.get("Configurations") for g in groups if g is not with_gpu[0])


def _fake_cli(bin_dir: Path, name: str, bucket: Path, prefix: str) -> None:
    """A stand-in `aws` / `gcloud` whose `cp SRC PREFIX/REL` copies SRC to bucket/REL."""
    bin_dir.mkdir(exist_ok=True)
    cli = bin_dir / name
    cli.write_text(f"""#!/bin/bash
set -euo pipefail
args=()
for a in "$@"; do [[ $a == --* ]] || args+=("$a"); done
# aws s3 cp SRC DST | gcloud storage cp SRC DST
src=${{args[2]}} dst=${{args[3]}}
[[ $dst == "{prefix}/"* ]] || {{ echo "copy outside {prefix}: $dst" >&2; exit 3; }}
rel=${{dst#"{prefix}/"}}
mkdir -p "{bucket}/$(dirname "$rel")"
cp "$src" "{bucket}/$rel"
""")
    cli.chmod(0o755)


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory):
    """deploy/upload.sh run against stand-in object stores: {scheme: folder as the bucket}."""
    import sys

    root = tmp_path_factory.mktemp("upload")
    buckets = {"s3": root / "s3", "gs": root / "gs"}
    _fake_cli(root / "bin", "aws", buckets["s3"], S3_PREFIX)
    _fake_cli(root / "bin", "gcloud", buckets["gs"], GS_PREFIX)
    env = {"PATH": f"{root / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
           "HOME": str(root)}
    out = subprocess.run(["bash", str(DEPLOY / "upload.sh"), S3_PREFIX, "--python", sys.executable],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = buckets["s3"] / "dist" / _wheel_name()
    out = subprocess.run(["bash", str(DEPLOY / "upload.sh"), GS_PREFIX, "--wheel", str(wheel)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return buckets


def _uploaded_files(bucket: Path) -> set[str]:
    return {str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file()}


def test_upload_puts_every_named_file_in_the_bucket(uploaded):
    """What the EMR and Dataproc files name under the prefix is exactly what upload.sh puts there."""
    named = {"s3": set(), "gs": set()}
    texts = [(EMR / n).read_text() for n in ("steps.json", "README.md")]
    for text in texts:
        named["s3"] |= {u[len(S3_PREFIX) + 1:] for u in re.findall(r"s3://YOUR-BUCKET/laion-spark/[\w./-]+\w", text)
                        if u.endswith((".sh", ".py", ".yaml", ".whl"))}
    for stage in STAGE_JOBS:
        cmd = _dry_run(DATAPROC / "submit.sh", "--prefix", GS_PREFIX, "--region", "r", "--dry-run", stage)
        named["gs"] |= {cmd[5][len(GS_PREFIX) + 1:], _flag(cmd, "--files")[len(GS_PREFIX) + 1:]}
    cmd = _dry_run(DATAPROC / "create-cluster.sh", "--prefix", GS_PREFIX, "--region", "r", "--dry-run")
    named["gs"].add(_flag(cmd, "--initialization-actions")[len(GS_PREFIX) + 1:])
    named["gs"].add(_flag(cmd, "--metadata").split("=", 1)[1][len(GS_PREFIX) + 1:])
    assert f"dist/{_wheel_name()}" in named["s3"] and "deploy/emr/bootstrap.sh" in named["s3"]
    for scheme, bucket in uploaded.items():
        files = _uploaded_files(bucket)
        assert named[scheme] <= files, named[scheme] - files
        for rel in files - {f"dist/{_wheel_name()}"}:  # byte copies of the checkout's files
            assert (bucket / rel).read_bytes() == (REPO / rel).read_bytes(), rel


def test_wheel_holds_what_the_jobs_import_and_no_pyspark(uploaded):
    """The wheel the bootstrap / init action install holds every command module the jobs reach,
    and requires pyspark only through an extra: the cluster's own Spark stays the only one."""
    import zipfile

    from laion_spark.job import COMMANDS

    with zipfile.ZipFile(uploaded["s3"] / "dist" / _wheel_name()) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"laion_spark-{_version()}.dist-info/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    pyspark = [r for r in requires if re.match(r"Requires-Dist: pyspark\b", r)]
    assert pyspark and all('extra == "spark"' in r for r in pyspark), pyspark
    assert any(r.startswith("Requires-Dist: gcsfs") and 'extra == "gcs"' in r for r in requires)
    for job in (REPO / "jobs").glob("*.py"):
        assert "from laion_spark.job import submit_main" in job.read_text()
    assert "laion_spark/job.py" in names and "laion_spark/cli.py" in names
    for cmd in COMMANDS:
        module = cmd.module.replace(".", "/")
        assert f"{module}.py" in names or f"{module}/__init__.py" in names, cmd.module


def _dry_run(script: Path, *args: str) -> list[str]:
    """The gcloud command the script would run (no gcloud here: --dry-run prints it)."""
    assert "--dry-run" in args
    out = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                         timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("image", ["2.2", "4.0"])
@pytest.mark.parametrize("gpu", [None, "nvidia-l4"])
def test_dataproc_cluster_command(image, gpu):
    args = ["--prefix", GS_PREFIX, "--region", "europe-west4", "--image", image, "--dry-run"]
    if gpu:
        args += ["--gpu", gpu]
    cmd = _dry_run(DATAPROC / "create-cluster.sh", *args)
    assert cmd[:4] == ["gcloud", "dataproc", "clusters", "create"]
    assert _flag(cmd, "--image-version") == image
    actions = _flag(cmd, "--initialization-actions").split(",")
    assert actions[-1] == f"{GS_PREFIX}/deploy/dataproc/init-action.sh"
    _check_uploaded(actions[-1], GS_PREFIX)
    metadata = dict(kv.split("=", 1) for kv in _flag(cmd, "--metadata").split(","))
    _check_uploaded(metadata["laion-spark-wheel"], GS_PREFIX)
    props = dict(kv.split("=", 1) for kv in _flag(cmd, "--properties").split(","))
    init = (DATAPROC / "init-action.sh").read_text()
    python = re.search(r"meta laion-spark-python (\S+)\)", init).group(1)
    assert props["spark:spark.pyspark.python"] == python
    assert props["spark:spark.executor.resource.gpu.discoveryScript"] == DISCOVERY
    assert DISCOVERY in init
    assert "spark:spark.driver.maxResultSize" in props
    if gpu:
        assert _flag(cmd, "--worker-accelerator").startswith(f"type={gpu},")
        assert len(actions) == 2 and actions[0].endswith("/gpu/install_gpu_driver.sh")
    else:
        assert "--worker-accelerator" not in cmd and len(actions) == 1


@pytest.mark.parametrize("stage", list(STAGE_JOBS))
def test_dataproc_job_command(stage):
    cmd = _dry_run(DATAPROC / "submit.sh", "--prefix", GS_PREFIX, "--region", "europe-west4",
                   "--dry-run", stage, "--set", "download.shard_size=5000")
    assert cmd[:5] == ["gcloud", "dataproc", "jobs", "submit", "pyspark"]
    assert cmd[5] == f"{GS_PREFIX}/jobs/{STAGE_JOBS[stage]}"
    _check_uploaded(cmd[5], GS_PREFIX)
    shipped = _flag(cmd, "--files")
    _check_uploaded(shipped, GS_PREFIX)
    props = dict(kv.split("=", 1) for kv in _flag(cmd, "--properties").split(","))
    assert props["spark.submit.deployMode"] == "cluster"
    job_args = cmd[cmd.index("--") + 1:]
    assert job_args[:2] == ["--config", shipped.rsplit("/", 1)[1]]
    assert job_args[2:] == ["--set", "download.shard_size=5000"]
    load_config(_repo_path(shipped, GS_PREFIX), ["download.shard_size=5000"])
    assert ("spark.task.resource.gpu.amount" in props) == (stage == "score")


@pytest.mark.parametrize("name,scheme", [("emr.yaml", "s3://"), ("dataproc.yaml", "gs://")])
def test_cluster_configs_load_and_put_the_index_under_the_lake(name, scheme):
    def index_output(cfg) -> str:  # "" means <lake.root>/_indices
        return cfg.index.output or cfg.lake.root.rstrip("/") + "/_indices"

    cfg = load_config(REPO / "conf" / name)
    assert cfg.lake.root.startswith(scheme)
    out = index_output(cfg)
    assert out.startswith(cfg.lake.root.rstrip("/") + "/"), \
        f"index.output {out} is not under lake.root {cfg.lake.root}"
    local = load_config(REPO / "conf" / "local.yaml")
    # the same place relative to the lake as the local default
    assert out[len(cfg.lake.root):] == index_output(local)[len(local.lake.root):]


def test_gcs_extra_declared():
    setup = (REPO / "setup.cfg").read_text()
    m = re.search(r"^gcs\s*=\s*\n((?:[ \t]+\S.*\n)+)", setup, re.M)
    assert m and "gcsfs" in m.group(1)
    # the Dataproc init action installs it by default
    assert "extras=$(meta laion-spark-extras gcs)" in (DATAPROC / "init-action.sh").read_text()

