"""The hospital node: data loading, local DP training, encryption and local evaluation."""
