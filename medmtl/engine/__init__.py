"""medmtl.engine"""
