"""The coordinating server: HE FedAvg strategy, run orchestration and release tracking."""
