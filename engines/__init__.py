"""What starts a federation: simulation, provisioning, the deployment harness, credentials."""
