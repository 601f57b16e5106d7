"""medmtl.networks"""
