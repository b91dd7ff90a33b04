"""scgnn-scale: scGNN (single-cell graph neural network) as an out-of-core engine for million-cell atlases."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scgnn-scale")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"


def _allow_arrow_strings() -> None:
    # pandas >= 3 holds strings as Arrow-backed StringArray; anndata writes those only when opted in
    import anndata

    if hasattr(anndata.settings, "allow_write_nullable_strings"):
        anndata.settings.allow_write_nullable_strings = True


_allow_arrow_strings()

from . import tl  # noqa: E402
from .config import RunConfig, load_config  # noqa: E402
from .errors import InputError  # noqa: E402
from .logs import set_verbosity  # noqa: E402
from .pipeline import STAGE_NAMES, read_run, run  # noqa: E402

__all__ = ["RunConfig", "load_config", "InputError", "STAGE_NAMES", "read_run", "run", "set_verbosity", "tl",
           "__version__"]
