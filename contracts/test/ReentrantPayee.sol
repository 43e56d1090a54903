// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @dev TEST ONLY. A researcher contract that tries to re-enter `withdraw` from its
///      receive hook to be paid twice.
interface IRegistry {
    function requestAccess(
        uint256 datasetId,
        uint256 agreedFee,
        uint32 agreedSeconds,
        uint32 codes,
        bytes32 purposeHash,
        bytes calldata sealedPurpose
    ) external payable returns (uint256);
    function registerDataset(
        string calldata pointer,
        bytes32 contentHash,
        uint256 fee,
        uint32 grantSeconds,
        uint32 terms,
        bool autoApprove
    ) external returns (uint256);
    function approve(uint256 datasetId, address researcher, uint256 requestId) external;
    function cancel(uint256 datasetId, uint256 requestId) external;
    function withdraw() external returns (uint256);
    function withdrawTo(address payable to) external returns (uint256);
}

/// @dev TEST ONLY. A contract acting as a researcher or a dataset's owner on the registry.
abstract contract RegistryParty {
    IRegistry public immutable registry;

    constructor(IRegistry registry_) {
        registry = registry_;
    }

    function request(uint256 datasetId, uint32 grantSeconds, uint32 codes, bytes32 purposeHash)
        external
        payable
        returns (uint256)
    {
        return registry.requestAccess{value: msg.value}(datasetId, msg.value, grantSeconds, codes, purposeHash, "");
    }

    /// @dev As a dataset's owner: register, then approve (and be paid in that call).
    function register(string calldata pointer, bytes32 contentHash, uint256 fee, uint32 grantSeconds, uint32 terms)
        external
        returns (uint256)
    {
        return registry.registerDataset(pointer, contentHash, fee, grantSeconds, terms, false);
    }

    function approve(uint256 datasetId, address researcher, uint256 requestId) external {
        registry.approve(datasetId, researcher, requestId);
    }

    function cancel(uint256 datasetId, uint256 requestId) external {
        registry.cancel(datasetId, requestId);
    }

    function withdraw() external returns (uint256) {
        return registry.withdraw();
    }
}

contract ReentrantPayee is RegistryParty {
    uint256 public reentryAttempts;
    uint256 public reentrySuccesses;
    uint256 public received;

    constructor(IRegistry registry_) RegistryParty(registry_) {}

    receive() external payable {
        received += msg.value;
        if (reentryAttempts < 3) {
            reentryAttempts += 1;
            try registry.withdraw() returns (uint256) {
                reentrySuccesses += 1;
            } catch {}
        }
    }
}

/// @dev TEST ONLY. A payee whose receive hook always reverts; it can still move its
///      credit elsewhere with `withdrawTo`.
contract RevertingPayee is RegistryParty {
    constructor(IRegistry registry_) RegistryParty(registry_) {}

    function withdrawTo(address payable to) external returns (uint256) {
        return registry.withdrawTo(to);
    }

    receive() external payable {
        revert("RevertingPayee: no ether accepted");
    }
}
