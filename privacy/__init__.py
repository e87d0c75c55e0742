"""Privacy machinery with no federation imports: DP accounting and its records."""
