"""medmtl.inference"""
