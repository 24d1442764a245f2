"""What a `laion-spark serve` worker is told: apart from the app so that the supervising
process (uvicorn's, which only starts workers) imports no faiss, torch or FastAPI."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from laion_spark.config import DownloadConfig, ServeConfig

SPEC_ENV = "LAION_SPARK_SERVE_SPEC"


@dataclass
class ServeSpec:
    """What every worker needs to build the same app (travels as JSON in an env variable)."""

    indices: list[tuple[str, str]]
    serve: ServeConfig = field(default_factory=ServeConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    clip_model: Optional[str] = None
    text_model: Optional[str] = None
    lake_root: Optional[str] = None
    preload_encoders: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeSpec":
        d = json.loads(text)
        return cls(indices=[tuple(x) for x in d["indices"]], serve=ServeConfig(**d["serve"]),
                   download=DownloadConfig(**d["download"]), clip_model=d.get("clip_model"),
                   text_model=d.get("text_model"), lake_root=d.get("lake_root"),
                   preload_encoders=d.get("preload_encoders", True))
