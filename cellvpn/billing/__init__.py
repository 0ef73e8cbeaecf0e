"""Billing: keys, orders, deposits, receipts and the ledger that redeems them."""
