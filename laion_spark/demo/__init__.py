"""The demo web: a seeded, generated web (pages, images, WARC files, ground truth) and a loopback
server for it, so the whole pipeline runs with no internet."""

from laion_spark.demo.scenes import Scene, describe_scene, random_scene, render_scene
from laion_spark.demo.server import DemoWebServer, serve_demo_web
from laion_spark.demo.web import DemoWeb, generate_demo_web, load_ground_truth

__all__ = ["DemoWeb", "DemoWebServer", "Scene", "describe_scene", "generate_demo_web", "load_ground_truth",
           "random_scene", "render_scene", "serve_demo_web"]
