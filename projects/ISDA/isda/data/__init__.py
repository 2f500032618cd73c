from .synthetic import generate_synthetic_dataset, register_synthetic_datasets  # noqa: F401,E402
