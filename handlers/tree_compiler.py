"""Tree ensembles compiled to native code (treelite + tl2cgen, the `trees` extra).

LightGBM's own predictor spends ~4 us per row of a 100-tree model on bookkeeping; the same
trees compiled to C predict in under 1 us. A compiled library is built once per model file
(keyed by its sha256) into a cache directory, and used only after it has predicted a probe
batch (random rows, NaN and infinities included) exactly as the framework itself does. Any
failure (the extra not installed, no C compiler, an unsupported model, a mismatch) leaves
the framework's predictor in place; it is logged, never fatal.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]
# The daemon sets this from `models.compile_trees` before it loads models.
enabled = True


def cache_dir() -> Path:
    """systemd's CacheDirectory= ($CACHE_DIRECTORY), else $XDG_CACHE_HOME or ~/.cache."""
    base = os.environ.get("CACHE_DIRECTORY") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "livepred" / "trees"


def compiled_predictor(
    model_file: Path, loader: str, reference: Predict, num_features: int
) -> Predict | None:
    """A compiled predictor equal to `reference` on a probe batch, or None. `loader`: the
    treelite frontend ("lightgbm")."""
    if not enabled:
        return None
    try:
        import tl2cgen
        import treelite
    except ImportError:
        return None
    try:
        library = _library(model_file, loader, treelite, tl2cgen)
        predictor = tl2cgen.Predictor(str(library), nthread=1)
    except Exception as exc:  # no compiler, unsupported model: the framework predicts
        log.info("tree model %s not compiled (%s); using the framework's predictor",
                 model_file, exc)
        return None

    def predict(rows: np.ndarray) -> np.ndarray:
        matrix = tl2cgen.DMatrix(np.ascontiguousarray(rows, dtype=np.float64), dtype="float64")
        return np.asarray(predictor.predict(matrix), dtype=np.float64).reshape(-1)

    probe = _probe(num_features)
    try:
        same = np.array_equal(predict(probe), np.asarray(reference(probe)).reshape(-1),
                              equal_nan=True)
    except Exception as exc:
        same = False
        log.info("compiled tree model %s failed its probe: %s", model_file, exc)
    if not same:
        log.warning("compiled tree model %s differs from the framework; not used", model_file)
        return None
    return predict


def _library(model_file: Path, loader: str, treelite: object, tl2cgen: object) -> Path:
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    version = getattr(tl2cgen, "__version__", "0")
    name = f"{digest}-tl2cgen{version}-q.so"
    # The library is loaded into this process: only from a folder (and a file) this user
    # owns and nobody else may write, never a shared one where another user could plant it.
    # Its own folders too (`livepred/trees` in the cache; in /tmp, whose sticky bit keeps
    # others from renaming it, one folder): another user able to write one of them could
    # swap the folder between the check and the load.
    cache = cache_dir()
    private_tmp = Path(tempfile.gettempdir()) / f"livepred-trees-{os.geteuid()}"
    for folder, own in ((cache, (cache.parent, cache)), (private_tmp, (private_tmp,))):
        try:
            own[0].parent.mkdir(parents=True, exist_ok=True)  # the user's cache root
            for level in own:
                level.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            continue
        untrusted = [level for level in own if not _only_ours(level) and not _tighten(level)]
        if untrusted:
            log.warning("not using %s for compiled tree models: another user owns it or may"
                        " write to it", untrusted[0])
            continue
        target = folder / name
        if target.exists() and _only_ours(target):
            return target
        try:
            return _build(model_file, loader, target, treelite, tl2cgen)
        except PermissionError:
            continue
    raise PermissionError("no writable cache directory of this user for compiled tree models")


def _tighten(folder: Path) -> bool:
    """A folder of ours that others may write to (made under umask 002): made ours alone."""
    try:
        st = folder.stat()
        if st.st_uid != os.geteuid() or folder.is_symlink():
            return False
        folder.chmod(st.st_mode & 0o755)
    except OSError:
        return False
    return _only_ours(folder)


def _only_ours(path: Path) -> bool:
    """Owned by this user, writable by no other (group or others), and not a link: a link
    another user made (in /tmp) to a folder of ours passed the owner check through it, and
    its maker could point it elsewhere between the check and the load."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return (st.st_uid == os.geteuid() and not st.st_mode & 0o022
            and not stat.S_ISLNK(st.st_mode))


def _build(model_file: Path, loader: str, target: Path, treelite: object, tl2cgen: object) -> Path:
    frontend = getattr(treelite.frontend, f"load_{loader}_model")  # type: ignore[attr-defined]
    model = frontend(str(model_file))
    # Build beside the target, then rename: another process never sees half a library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # `quantize`: each feature value is first mapped to its index among the model's
        # thresholds for that feature, and the trees compare integers; the same leaves, ~10%
        # faster on the demo model's real inputs (0.97 -> 0.88 us per row at B=4096).
        # tl2cgen prints its native log lines with print(): kept off stdout, where they
        # would break `inspect --json` and the like.
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):
            tl2cgen.export_lib(  # type: ignore[attr-defined]
                model, toolchain="gcc", libpath=partial,
                params={"parallel_comp": 1, "quantize": 1}, verbose=False,
            )
        if chatter.getvalue().strip():
            log.debug("tl2cgen: %s", chatter.getvalue().strip())
        os.chmod(partial, 0o700)  # whatever the umask: a library nobody else may change
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("compiled tree model %s -> %s", model_file, target)
    return target


def _probe(num_features: int, rows: int = 512) -> np.ndarray:
    """Rows spread over many scales, with NaN, +-inf and zeros sprinkled in (seeded)."""
    rng = np.random.default_rng(20261126)
    x = rng.normal(size=(rows, num_features)) * 10.0 ** rng.integers(-4, 5, (rows, 1))
    x[rng.random(x.shape) < 0.05] = np.nan
    x[rng.random(x.shape) < 0.01] = np.inf
    x[rng.random(x.shape) < 0.01] = -np.inf
    x[rng.random(x.shape) < 0.02] = 0.0
    return x.astype(np.float32)
