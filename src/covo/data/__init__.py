from covo.data.datamodule import PromptDataModule

__all__ = ["PromptDataModule"]
