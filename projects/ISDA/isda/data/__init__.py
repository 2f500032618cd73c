from .dataset_mapper import ISDADatasetMapper
from .synthetic import generate_synthetic_dataset, register_synthetic_datasets

__all__ = ["ISDADatasetMapper", "generate_synthetic_dataset", "register_synthetic_datasets"]
