"""Training: the driver (train_model), the run on storage, the in-process and Ray Train backends, retraining."""
