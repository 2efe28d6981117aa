"""lopfast ops: PyTorch reference, torch.library registration, autograd and backend choice, one file per op."""
