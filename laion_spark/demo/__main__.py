"""`python -m laion_spark.demo OUT_DIR`: generate the demo web and serve it until Ctrl-C
(to look at it in a browser, or point a stage at it by hand)."""

from __future__ import annotations

import argparse
import logging
import threading

from laion_spark.demo.server import serve_demo_web


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m laion_spark.demo", description=__doc__)
    parser.add_argument("out_dir", help="folder for site/, warc/ and ground_truth.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pages", type=int, default=240)
    parser.add_argument("--warc-files", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with serve_demo_web(args.out_dir, seed=args.seed, n_pages=args.pages, n_warc_files=args.warc_files) as (server, web):
        print(f"serving {web.site_dir} at {server.base_url}/ (ground truth: {web.ground_truth_path}); Ctrl-C stops")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
