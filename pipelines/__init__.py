"""flanops: Flan-T5 through its whole lifecycle as one SageMaker pipeline."""
