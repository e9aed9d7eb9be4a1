"""Train and prune with LightningCLI: ``python train.py fit --config configs/quickstart.yaml``."""

from lightning_prune.cli import main

if __name__ == "__main__":
    main()
