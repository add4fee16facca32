"""The fast-mode platform around the engine: model catalog and lifecycle, accounts, rate limits,
pricing, the usage ledger and its reports, message batches."""
