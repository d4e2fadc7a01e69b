"""Image→text top-k predictions; same CLI and output lines as the reference make_topk_predictions_tr.py."""

from functools import partial

from cn_clip.eval.make_topk_predictions import main as _main

main = partial(_main, direction="image_to_text")

if __name__ == "__main__":
    raise SystemExit(main())
