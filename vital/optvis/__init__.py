"""optvis"""
