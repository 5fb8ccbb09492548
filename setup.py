"""distill: distil compact BERT, DistilBERT and ELECTRA students from large teachers."""

from setuptools import find_packages, setup

setup(
    name="distill",
    version="0.1.0",
    description="Distil compact BERT/DistilBERT/ELECTRA students from large teachers, and grade them on GLUE",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["distill", "distill.*", "glue_eval", "glue_eval.*"]),
    install_requires=[
        "torch>=2.4",  # install torch first (see README): a bare requirement may pull a CUDA build
        "transformers>=5.0,<6",
        "accelerate>=1.0",  # transformers' Trainer needs it (GLUE fine-tuning)
        "datasets>=3.0",
        "numpy",
        "scikit-learn",
        "scipy",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "safetensors",
        "mwparserfromhell>=0.6",  # strips MediaWiki markup from raw Wikipedia dumps
    ],
    # sentence-transformers: the client the tests load sentence-transformers students in;
    # TextBrewer: tests/test_peers.py checks bench/peers.py's TextBrewer path (its deps are all ours already)
    # export: distill-export writes ONNX files (onnx) and checks, quantises and serves them (onnxruntime);
    # only distill.export and glue-eval's --backend onnx import them, never the training path
    # mteb: embed-eval runs MTEB's own evaluators (installs in about 20 s beside torch 2.13 and keeps it)
    extras_require={"test": ["pytest>=7", "sentence-transformers>=6,<7", "textbrewer==0.2.1.post1", "mteb>=2.26,<3"],
                    "embed": ["sentence-transformers>=6,<7", "mteb>=2.26,<3"],
                    "export": ["onnx>=1.16", "onnxruntime>=1.18"]},
    entry_points={
        "console_scripts": [
            "distill-init=distill.cli:init_main",
            "distill-train=distill.cli:train_main",
            "glue-eval=glue_eval.cli:main",
            "embed-eval=glue_eval.embedding:main",
            "distill-export=distill.export.cli:main",
        ]
    },
)
