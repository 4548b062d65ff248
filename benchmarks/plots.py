"""Plot helpers that import nothing but what they are handed (no TensorFlow, no matplotlib at
import): benchmarks.gpu runs on a bare GPU machine and shares them with benchmarks.run."""


def log_axes(ax, xlabel: str, ylabel: str) -> None:
    """A log-log panel over sequence lengths (powers of two), gridded, with its legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
