"""A local S3-compatible server for tests: moto's server in a subprocess on 127.0.0.1.

A subprocess (not an in-process thread) so the server neither competes for the test's GIL nor
dies with a Spark JVM hiccup, and so Spark's s3a client, delta-rs and s3fs all talk to the same
real HTTP endpoint. Credentials are fixed test values that live here and in the fixture only;
library code gets them through config (LakeConfig.storage_options, SparkConfig.extra_conf).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ACCESS_KEY = "laion-test-key"
SECRET_KEY = "laion-test-secret"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0  # moto imports a lot on first start; a 2-core CI box can take ~10 s


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """One moto server process; `start()` blocks until it answers, `stop()` ends it."""

    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        self.port = self.port or _free_port()
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_DEFAULT_REGION=REGION)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode} on port {self.port}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    log.info("moto S3 server up at %s", self.endpoint)
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients' settings --------------------------------------------------------------------
    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (idempotent) and return "s3://name"."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name=REGION)
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    @property
    def storage_options(self) -> dict[str, str]:
        """For delta-rs (deltalake >= 1.0). S3 commits are safe without a lock: deltalake 1.x writes
        each _delta_log entry with a conditional put (If-None-Match: *), which AWS S3 and moto
        honour, so no DynamoDB lock and no AWS_S3_ALLOW_UNSAFE_RENAME are needed."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",
        }

    @property
    def fsspec_options(self) -> dict:
        """For s3fs / fsspec.filesystem("s3", **options)."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION}}

    @property
    def spark_conf(self) -> dict[str, str]:
        """spark.hadoop.fs.s3a.* for Spark's s3a client (hadoop-aws on the class path)."""
        p = "spark.hadoop.fs.s3a."
        return {
            p + "endpoint": self.endpoint,
            p + "endpoint.region": REGION,
            p + "path.style.access": "true",
            p + "connection.ssl.enabled": "false",
            p + "access.key": ACCESS_KEY,
            p + "secret.key": SECRET_KEY,
            p + "aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
            p + "impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
            # s3:// paths through the same client, so one lake URI works for Spark and delta-rs
            "spark.hadoop.fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        }
