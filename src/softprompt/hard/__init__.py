"""hard"""
