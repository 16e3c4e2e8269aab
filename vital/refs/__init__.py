"""refs"""
