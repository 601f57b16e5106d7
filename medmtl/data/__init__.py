"""medmtl.data"""
