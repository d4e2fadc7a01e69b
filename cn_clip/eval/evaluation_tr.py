"""Image→text scoring; same CLI, console lines and output JSON as the reference evaluation_tr.py."""

from functools import partial

from cn_clip.eval.evaluation import main as _main
from cn_clip.eval.metrics import compute_score as _compute_score

main = partial(_main, direction="image_to_text")
compute_score = partial(_compute_score, direction="image_to_text")

if __name__ == "__main__":
    raise SystemExit(main())
